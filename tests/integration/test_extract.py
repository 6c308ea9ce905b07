"""`ftkit extract`: SVD of the fine-tune's weight deltas as a PEFT LoRA adapter."""

from __future__ import annotations

import json

import torch

from tests.support.helpers import run_cli


def extract(run, out, *args: str) -> dict:
    code, stdout, err = run_cli("extract", "--tuned", str(run), "--out", str(out), *args)
    assert code == 0, err
    assert stdout == "" and "energy" in err
    return json.loads((out / "extract_report.json").read_text())


def test_full_rank_reproduces_the_tuned_linear_weights(trained_runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = trained_runs["full"]
    report = extract(run, tmp_path / "full-rank", "--rank", "128", "--base", str(run / "base"))
    assert all(layer["retained_energy"] > 1 - 1e-6 for layer in report["layers"])
    base = AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, tmp_path / "full-rank").merge_and_unload().state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).state_dict()
    linear = [f"{layer['module']}.weight" for layer in report["layers"]]
    assert "lm_head.weight" in linear and len(linear) == 15  # 7 per decoder layer × 2 + the head
    # full rank: B A = U S Vᵀ = Δ exactly, up to float32 SVD round-off
    assert max(float((merged[k] - tuned[k]).abs().max()) for k in linear) <= 1e-4
    # embeddings and norms are not linear layers: reported, not captured
    assert "model.embed_tokens.weight" in {o["tensor"] for o in report["not_captured"]}


def test_low_rank_lands_between_base_and_tuned(trained_runs, tmp_path):
    report = extract(trained_runs["full"], tmp_path / "r2", "--rank", "2")
    assert report["adapter_r"] == 2 and all(layer["r"] == 2 for layer in report["layers"])
    assert all(0.0 < layer["retained_energy"] < 1.0 for layer in report["layers"])
    assert report["val_loss_tuned"] < report["val_loss_extracted"] < report["val_loss_base"]


def test_extract_refuses_an_adapter(trained_runs, tmp_path):
    code, out, err = run_cli("extract", "--tuned", str(trained_runs["lora"]), "--out", str(tmp_path / "x"))
    assert code == 2 and out == "" and "already an adapter" in err
    assert not (tmp_path / "x").exists()


def test_summary_is_a_table_of_ranks_and_energies():
    from ftkit.commands.extract import summary_lines

    report = {
        "out": "adapter",
        "adapter_r": 4,
        "layers": [
            {"module": "model.layers.0.mlp.up_proj", "r": 4, "retained_energy": 0.91234},
            {"module": "lm_head", "r": 12, "retained_energy": 1.0},
        ],
        "not_captured": [{"tensor": "model.norm.weight", "relative_change": 0.0259}],
        "val_data": "val.jsonl",
        "val_loss_base": 5.6411,
        "val_loss_extracted": 3.4912,
        "val_loss_tuned": 2.9844,
        "wall_s": 2.74,
    }
    lines = summary_lines(report).splitlines()
    assert lines[0] == "extracted 2 linear layers → adapter (adapter r 4)"
    assert lines[1].split() == ["module", "r", "retained", "energy"]
    assert lines[2].split() == ["model.layers.0.mlp.up_proj", "4", "0.9123"]
    assert lines[3].split() == ["lm_head", "12", "1.0000"]
    assert lines[5].split() == ["model.norm.weight", "2.59%"]
    assert lines[6] == "val loss on val.jsonl: base 5.6411 · base + extracted 3.4912 · full fine-tune 2.9844"
    assert lines[7] == "2.7s"
