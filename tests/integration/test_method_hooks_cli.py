"""What a method needs from the model, checked by `ftkit train` before any weight loads."""

from __future__ import annotations

import pytest
from transformers import MambaConfig

from ftkit.models.builtin import build_byte_tokenizer, builtin_config
from tests.support.helpers import make_recipe, run_cli


def test_model_problems_stop_the_run_before_loading_weights(tmp_path, tiny_data):
    """(IA)³ with its default targets on an architecture peft has no defaults for: exit 2 naming the
    key, no run directory. The model directory holds a config and a tokenizer but no weights at all,
    so reaching weight loading would have failed differently."""
    model_dir = tmp_path / "mamba-without-weights"
    MambaConfig(vocab_size=262, hidden_size=16, num_hidden_layers=1).save_pretrained(model_dir)
    build_byte_tokenizer().save_pretrained(model_dir)
    recipe = make_recipe(tmp_path, tiny_data, model={"name": str(model_dir)}, method={"name": "ia3"})
    code, out, err = run_cli("train", str(recipe))
    assert code == 2 and out == ""
    assert "method.target_modules: peft has no (IA)³ default for model type mamba" in err
    assert "method.feedforward_modules:" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("method", "train", "expected"),
    [
        ({"name": "adalora", "tinit": 4, "tfinal": 4}, {"max_steps": 6}, "method.tinit: tinit 4 + tfinal 4 leave no"),
        ({"name": "delta_lora", "start_step": 6}, {"max_steps": 6}, "method.start_step: 6 is not below"),
        ({"name": "freeze", "trainable_layers": 3}, {}, "method.trainable_layers: 3 is more than the model's 2"),
        ({"name": "lora", "target_modules": ["qproj"]}, {}, "method.target_modules: qproj not among"),
    ],
)
def test_run_problems_stop_the_run_before_loading_weights(tmp_path, tiny_data, method, train, expected):
    """Checks that need the run's facts (total steps) or the model's modules run on a meta skeleton
    before the run directory exists (issue 15: AdaLoRA's schedule check used to leave recipe.yaml and
    base/ behind). The model directory has no weights, so a check made after loading would fail
    differently."""
    model_dir = tmp_path / "llama-without-weights"
    builtin_config("builtin:micro-llama").save_pretrained(model_dir)
    build_byte_tokenizer().save_pretrained(model_dir)
    recipe = make_recipe(tmp_path, tiny_data, model={"name": str(model_dir)}, method=method, train=train)
    code, out, err = run_cli("train", str(recipe))
    assert code == 2 and out == ""
    assert expected in err, err
    assert not (tmp_path / "runs").exists()
