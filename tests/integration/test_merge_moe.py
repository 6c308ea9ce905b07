"""`ftkit merge --config` with `method: moe`: fine-tuned models become a Mixtral mixture of experts
that transformers loads, verified against the dense models; bad inputs are refused before writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.support.helpers import run_cli


def moe_config(trained_runs, **extra) -> dict:
    """Two experts on one micro-llama base: the LoRA run (its adapter merged into its base) and the full run."""
    lora, full = trained_runs["lora"], trained_runs["full"]
    experts = [
        {"model": str(lora), "prompts": ["A red cube of size 3.", "A teal ring of size 9."]},
        {"model": str(full / "final"), "prompts": ["Extract."]},
    ]
    return {"method": "moe", "base": str(lora / "base"), "experts": experts, **extra}


def merge(tmp_path: Path, config: dict, name: str = "moe") -> tuple[int, str, Path]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / name
    code, stdout, err = run_cli("merge", "--config", str(path), "--out", str(out))
    assert stdout == ""
    return code, err, out


def test_moe_of_two_fine_tunes_loads_as_mixtral_and_is_verified(trained_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    code, err, out = merge(tmp_path, moe_config(trained_runs))
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 2
    full = AutoModelForCausalLM.from_pretrained(trained_runs["full"] / "final", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(trained_runs["lora"] / "base", dtype=torch.float32)
    for moe_layer, full_layer, base_layer in zip(model.model.layers, full.model.layers, base.model.layers, strict=True):
        experts, inter = moe_layer.mlp.experts, full.config.intermediate_size
        # expert 1 is the full fine-tune's MLP: gate_proj → first half of gate_up_proj, up_proj → second
        assert torch.equal(experts.gate_up_proj[1][:inter], full_layer.mlp.gate_proj.weight)
        assert torch.equal(experts.gate_up_proj[1][inter:], full_layer.mlp.up_proj.weight)
        assert torch.equal(experts.down_proj[1], full_layer.mlp.down_proj.weight)
        # attention comes from the base, not from the full fine-tune
        assert torch.equal(moe_layer.self_attn.q_proj.weight, base_layer.self_attn.q_proj.weight)
        # gate: hidden rows are unit vectors, one per expert, and differ between the experts
        router = moe_layer.mlp.gate.weight
        assert torch.allclose(router.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert not torch.allclose(router[0], router[1])
    report = json.loads((out / "merge_report.json").read_text())
    assert [c["experts"] for c in report["checks"]] == ["base", "experts[0]", "experts[1]"]
    assert all(c["rel_logit_diff"] <= 1e-4 and c["top1_agreement"] == 1.0 for c in report["checks"])
    assert (out / "merge_config.yaml").is_file() and (out / "tokenizer.json").is_file()
    assert -1.0 <= report["gate_max_cosine"] < 1.0
    with torch.no_grad():  # a real mixture: it runs and differs from the base
        ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("gate", ["uniform", "random"])
def test_gate_initialisations(trained_runs, tmp_path, gate):
    from transformers import AutoModelForCausalLM

    config = moe_config(trained_runs, gate=gate, experts_per_token=1)
    code, err, out = merge(tmp_path, config)
    assert code == 0, err
    routers = [layer.mlp.gate.weight for layer in AutoModelForCausalLM.from_pretrained(out).model.layers]
    if gate == "uniform":
        assert all(torch.count_nonzero(r) == 0 for r in routers)
    else:
        assert all(torch.allclose(r.norm(dim=-1), torch.ones(2), atol=1e-5) for r in routers)


def test_a_wrong_expert_mapping_fails_verification_and_writes_nothing(trained_runs, tmp_path, monkeypatch):
    from ftkit.commands import merge_moe

    # gate_proj written as w3 and up_proj as w1: the MoE of identical experts no longer equals the dense model
    monkeypatch.setattr(merge_moe, "EXPERT_TENSORS", {"gate_proj": "w3", "up_proj": "w1", "down_proj": "w2"})
    code, err, out = merge(tmp_path, moe_config(trained_runs))
    assert code != 0 and "of the logits' scale" in err and not out.exists()
    assert not list(tmp_path.glob(".moe.tmp-*"))


def _refused(tmp_path: Path, config: dict) -> str:
    code, err, out = merge(tmp_path, config, name="bad")
    assert code == 2, err
    assert not out.exists() and not list(tmp_path.glob(".bad*"))
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_more_experts_per_token_than_experts_is_refused(trained_runs, tmp_path):
    err = _refused(tmp_path, moe_config(trained_runs, experts_per_token=3))
    assert "experts_per_token" in err and "only 2 experts" in err


def test_a_missing_expert_is_refused(trained_runs, tmp_path):
    config = moe_config(trained_runs)
    config["experts"][1]["model"] = str(tmp_path / "nowhere")
    err = _refused(tmp_path, config)
    assert "experts[1].model" in err and "nowhere" in err


def test_hidden_gate_without_prompts_is_refused(trained_runs, tmp_path):
    config = moe_config(trained_runs)
    config["experts"][0]["prompts"] = []
    assert "experts[0].prompts" in _refused(tmp_path, config)


def test_an_expert_with_another_vocabulary_is_refused_naming_the_tensor(trained_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained_runs["full"] / "final")
    model.resize_token_embeddings(300)
    model.save_pretrained(tmp_path / "bigger-vocab")
    config = moe_config(trained_runs)
    config["experts"][1]["model"] = str(tmp_path / "bigger-vocab")
    err = _refused(tmp_path, config)
    assert "experts[1]" in err and "(300, 64)" in err and ".weight has shape" in err  # the first tensor that differs


def test_an_unsupported_layout_is_refused_naming_it(trained_runs, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = tmp_path / "qwen"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=262, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(qwen)  # fmt: skip
    config = moe_config(trained_runs)
    config["base"] = str(qwen)
    err = _refused(tmp_path, config)
    assert "qwen2" in err and "Llama/Mistral layout" in err


def test_moe_config_keys_are_checked_like_a_recipe(tmp_path):
    config = {"method": "moe", "base": "b", "experts": [{"model": "a", "prompts": ["p"]}] * 2, "experts_per_tokn": 2}
    err = _refused(tmp_path, config)
    assert "bad.yaml:" in err and "experts_per_tokn: unknown key (did you mean experts_per_token?)" in err
    code, err, out = merge(tmp_path, {**config, "method": "mo"}, name="typo")  # every problem at once
    assert code == 2 and not out.exists() and "method:" in err and "(did you mean moe?)" in err
