"""LoRA-drop: the layer choice, the shared adapters (one tensor, counted once, saved as copies that
peft loads back), and its record."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.utils import set_seed

from ftkit.errors import ModelError
from ftkit.methods import RunInfo, get_method
from ftkit.methods.lora_drop import choose_layers
from ftkit.recipe.methods import LoraConfig, LoraDropConfig
from ftkit.tasks.causal_lm import SFT
from ftkit.train.optim import build_optimizer

LAYERS = [f"model.layers.{i}" for i in range(4)]


@pytest.mark.parametrize(
    ("threshold", "kept"),
    [(0.5, {"a"}), (0.8, {"a", "b"}), (0.9, {"a", "b", "c"}), (0.95, {"a", "b", "c"}), (1.0, {"a", "b", "c", "d"})],
)
def test_keeps_the_fewest_most_important_layers_reaching_the_threshold(threshold, kept):
    importance = {"d": 0.05, "b": 0.3, "a": 0.5, "c": 0.15}
    assert choose_layers(importance, threshold) == kept


@pytest.fixture(scope="module")
def setting(deep_micro_base, tiny_data):
    from ftkit.data import load_splits
    from ftkit.models.builtin import build_byte_tokenizer
    from ftkit.recipe.schema import DataSection, TrainSection

    tokenizer = build_byte_tokenizer()
    examples = load_splits(DataSection(train=str(tiny_data / "train.jsonl"), max_length=128), tokenizer, 0).train
    train = TrainSection(lr=1e-2, batch_size=8, max_steps=10)
    run = RunInfo(
        total_steps=10,
        train=train,
        examples=examples,
        pad_id=tokenizer.pad_token_id,
        objective=SFT(),
        build_optimizer=build_optimizer,
    )
    return deep_micro_base, run


def base_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_shared_layers_hold_one_adapter_counted_once_and_saved_as_a_plain_lora(setting, tmp_path):
    path, run = setting
    config = LoraDropConfig(r=4, alpha=8, dropout=0.0, sample_fraction=0.25, sample_steps=5, threshold=0.3)
    set_seed(0)
    model = get_method("lora_drop").apply(base_model(path), config, RunInfo(**{**run.__dict__, "run_dir": tmp_path}))
    record = json.loads((tmp_path / "lora_drop.json").read_text())
    assert [entry["layer"] for entry in record["layers"]] == LAYERS
    assert sum(entry["importance"] for entry in record["layers"]) == pytest.approx(1.0)
    kept, shared = record["kept"], record["shared"]
    assert sorted(kept + shared) == LAYERS and len(shared) >= 2  # threshold 0.3 of 4 layers keeps 1 or 2
    assert sum(e["importance"] for e in record["layers"] if e["kept"]) >= 0.3

    layers = model.base_model.model.model.layers
    q_a = [layers[int(name.rsplit(".", 1)[1])].self_attn.q_proj.lora_A["default"].weight for name in shared]
    assert all(weight is q_a[0] for weight in q_a)  # one nn.Parameter
    kept_q = layers[int(kept[0].rsplit(".", 1)[1])].self_attn.q_proj.lora_A["default"].weight
    assert kept_q is not q_a[0]

    set_seed(0)
    plain = get_method("lora").apply(base_model(path), LoraConfig(r=4, alpha=8, dropout=0.0))
    per_layer = plain.get_nb_trainable_parameters()[0] // len(LAYERS)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == per_layer * (len(kept) + 1) == model.get_nb_trainable_parameters()[0]
    # back at the init after scoring: the kept layers start where plain LoRA does
    plain_q = plain.base_model.model.model.layers[int(kept[0].rsplit(".", 1)[1])].self_attn.q_proj
    assert torch.equal(kept_q, plain_q.lora_A["default"].weight)
    assert not any(layer.self_attn.q_proj.lora_B["default"].weight.any() for layer in layers)  # B = 0 again

    # train the shared adapter a little, so the copies peft saves carry a trained value
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "final", safe_serialization=True)
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(base_model(path), tmp_path / "final")
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    model.eval(), loaded.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert (loaded(input_ids=ids).logits - expected).abs().max() < 1e-5
        assert (loaded.merge_and_unload()(input_ids=ids).logits - expected).abs().max() < 1e-4


def test_resumed_apply_reads_the_choice_and_does_not_score(setting, tmp_path):
    path, run = setting
    config = LoraDropConfig(r=4, alpha=8, threshold=0.3)
    record = {"kept": ["model.layers.2"], "shared": ["model.layers.0", "model.layers.1", "model.layers.3"]}
    (tmp_path / "lora_drop.json").write_text(json.dumps(record))
    resumed = RunInfo(**{**run.__dict__, "run_dir": tmp_path, "resume_from": tmp_path / "checkpoints" / "step-2"})
    model = get_method("lora_drop").apply(base_model(path), config, resumed)
    layers = model.base_model.model.model.layers
    weights = [layer.mlp.down_proj.lora_B["default"].weight for layer in layers]
    assert weights[0] is weights[1] is weights[3] and weights[2] is not weights[0]

    (tmp_path / "lora_drop.json").write_text(json.dumps({"kept": ["model.layers.9"]}))
    with pytest.raises(ModelError, match="model.layers.9 are not layers of this model"):
        get_method("lora_drop").apply(base_model(path), config, resumed)
    (tmp_path / "lora_drop.json").unlink()
    with pytest.raises(ModelError, match="lora_drop.json: cannot read LoRA-drop's layer choice"):
        get_method("lora_drop").apply(base_model(path), config, resumed)


def test_without_examples_every_layer_keeps_its_own_lora(setting):
    """ftkit plan and meta-device counts have no data to score: the upper bound, LoRA's count."""
    path, _ = setting
    config = LoraDropConfig(r=4, alpha=8, threshold=0.3)
    model = get_method("lora_drop").apply(base_model(path), config, RunInfo(total_steps=10))
    plain = get_method("lora").apply(base_model(path), LoraConfig(r=4, alpha=8))
    assert model.get_nb_trainable_parameters()[0] == plain.get_nb_trainable_parameters()[0]


def test_key_of_another_method_names_it_and_lists_lora_drop_s_keys():
    from ftkit.errors import RecipeError
    from ftkit.recipe import parse_recipe

    with pytest.raises(RecipeError) as caught:
        parse_recipe("data: {train: d.jsonl}\nmethod: {name: lora_drop, update_ratio: 0.5}\n")
    message = str(caught.value)
    assert "method.update_ratio" in message and "delta_lora" in message
    assert all(key in message for key in ("sample_fraction", "sample_steps", "threshold"))
