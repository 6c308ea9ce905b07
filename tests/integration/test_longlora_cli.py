"""LongLoRA through the CLI: refusals before any weight loads, and the README's training commands."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import GPT2Config

from ftkit.models.builtin import build_byte_tokenizer
from tests.support.helpers import make_recipe, run_cli


def test_cli_refuses_a_non_rotary_model_before_loading_weights(tmp_path, tiny_data):
    """A GPT-2 directory with no weights file at all: the refusal must come first."""
    model_dir = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=262).save_pretrained(model_dir)
    build_byte_tokenizer().save_pretrained(model_dir)
    recipe = make_recipe(tmp_path, tiny_data, model={"name": str(model_dir)}, method={"name": "longlora"})
    code, out, err = run_cli("train", str(recipe))
    assert (code, out) == (2, "")
    (line,) = err.strip().splitlines()
    assert "longlora" in line and "rotary" in line
    assert not (tmp_path / "runs").exists()


def test_recipe_refuses_what_s2_attn_cannot_run_with(tmp_path, tiny_data):
    recipe = make_recipe(
        tmp_path,
        tiny_data,
        model={"name": "builtin:micro-llama", "attn_implementation": "eager"},
        method={"name": "longlora", "rope_scaling_factor": 2.0, "group_size_ratio": 0.1},
        data={"max_length": 8},
        train={"optimizer": "adamw"},
    )
    text = recipe.read_text().replace("attn_implementation: eager", "attn_implementation: eager\n  quantization: {}")
    recipe.write_text(text)
    code, _, err = run_cli("validate", str(recipe))
    assert code == 2
    for key in ("model.attn_implementation", "method.rope_scaling_factor", "method.group_size_ratio"):
        assert key in err, key


def test_readme_longlora_commands_run(tmp_path, monkeypatch):
    """docs/methods.md's `ftkit train recipes/methods/longlora.yaml ...` lines, cut to two steps; the second
    one (position interpolation) leaves base/ with the linear-RoPE config that final/ points to."""
    root = Path(__file__).resolve().parents[2]
    commands = [
        line.split()[1:]
        for line in (root / "docs" / "methods.md").read_text().splitlines()
        if line.strip().startswith("ftkit train recipes/methods/longlora.yaml")
    ]
    assert len(commands) == 2
    monkeypatch.chdir(root)
    short = [f"--set={key}" for key in ("train.max_steps=2", "train.samples=0", "train.batch_size=4")]
    short += [f"--set={key}" for key in ("data.max_samples=4", "data.val=null")]
    for i, args in enumerate(commands):
        code, out, err = run_cli(*args, *short, "--output-dir", str(tmp_path / f"run{i}"))
        assert (code, out) == (0, ""), err
    adapter = json.loads((tmp_path / "run1" / "final" / "adapter_config.json").read_text())
    base = json.loads((Path(adapter["base_model_name_or_path"]) / "config.json").read_text())
    assert base["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
