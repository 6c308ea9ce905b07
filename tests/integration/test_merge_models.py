"""`ftkit merge --config`: model merges on real model directories, architecture checks, and
combining LoRA adapters into one with peft's add_weighted_adapter."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from tests.support.helpers import run_cli


def merge_config(tmp_path: Path, out_name: str, config: dict) -> tuple[int, str, Path]:
    path = tmp_path / f"{out_name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / out_name
    code, stdout, err = run_cli("merge", "--config", str(path), "--out", str(out))
    assert stdout == ""
    return code, err, out


def state(path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_linear_merge_of_a_model_with_itself_returns_it(trained_runs, tmp_path):
    run = trained_runs["full"]
    models = [{"model": str(run), "weight": 0.5}, {"model": str(run / "final"), "weight": 0.5}]
    code, err, out = merge_config(tmp_path, "self", {"method": "linear", "models": models})
    assert code == 0, err
    expected, merged = state(run / "final"), state(out)
    assert merged.keys() == expected.keys()
    assert all(torch.allclose(merged[k], expected[k], atol=1e-7, rtol=0) for k in expected)
    assert json.loads((out / "merge_report.json").read_text())["method"] == "linear"


def test_task_vector_merge_of_the_fine_tune_with_weight_one_is_the_fine_tune(trained_runs, tmp_path):
    run = trained_runs["full"]
    config = {"method": "ties", "base": str(run / "base"), "models": [{"model": str(run)}], "density": 1.0}
    code, err, out = merge_config(tmp_path, "ties", config)
    assert code == 0, err
    expected, merged = state(run / "final"), state(out)
    # one model, density 1: θ_base + (θ − θ_base) = θ up to float32 round-off
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6, rtol=0) for k in expected)


def test_passthrough_stacks_layers(trained_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    run = trained_runs["full"]
    slices = [{"model": str(run), "layers": [0, 2]}, {"model": str(run / "base"), "layers": [1, 2]}]
    code, err, out = merge_config(tmp_path, "deeper", {"method": "passthrough", "slices": slices})
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_hidden_layers == 3
    merged, base = model.state_dict(), state(run / "base")
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])


def test_mismatched_architectures_are_refused(trained_runs, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "wider"
    LlamaForCausalLM(LlamaConfig(vocab_size=262, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)  # fmt: skip
    models = [{"model": str(trained_runs["full"])}, {"model": str(other)}]
    code, err, out = merge_config(tmp_path, "bad", {"method": "linear", "models": models})
    assert code == 2 and not out.exists()
    assert "architectures differ" in err and "shape" in err and len(err.strip().splitlines()) == 1


def test_adapters_combine_into_one_loadable_adapter(trained_runs, tmp_path):
    """cat of one adapter with itself at weights 0.5 + 0.5 is that adapter: Σ w_i s B_i A_i = s B A."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = trained_runs["lora"]
    models = [{"model": str(run), "weight": 0.5}, {"model": str(run / "final"), "weight": 0.5}]
    code, err, out = merge_config(tmp_path, "combined", {"method": "adapters", "combination": "cat", "models": models})
    assert code == 0, err
    probe = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))

    def adapter_logits(adapter: Path) -> torch.Tensor:
        base = AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32)
        with torch.no_grad():
            return PeftModel.from_pretrained(base, adapter).eval()(input_ids=probe).logits

    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16  # cat: ranks add up
    assert (adapter_logits(out) - adapter_logits(run / "final")).abs().max() <= 1e-5


def test_an_adapter_is_not_a_model_to_merge(trained_runs, tmp_path):
    models = [{"model": str(trained_runs["lora"])}, {"model": str(trained_runs["full"])}]
    code, err, _ = merge_config(tmp_path, "mixed", {"method": "linear", "models": models})
    assert code == 2 and "is an adapter" in err and "models[0].model" in err
