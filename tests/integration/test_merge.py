"""`ftkit merge RUN --out DIR`: the merged model equals base + adapter, loads with plain
transformers, holds no LoRA tensors, and a failed or refused merge leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.support.helpers import run_cli


def val_batch(run: Path) -> dict:
    from ftkit.data import collate, load_splits
    from ftkit.models.builtin import build_byte_tokenizer
    from ftkit.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    tokenizer = build_byte_tokenizer()
    return collate(load_splits(recipe.data, tokenizer, recipe.train.seed).val[:8], tokenizer.pad_token_id)


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out[batch["attention_mask"].bool()]


def base_plus_adapter(run: Path, quantized: bool = False):
    """The reference, built with the real libraries only: the run's base + its adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
        kwargs["device_map"] = {"": "cpu"}
    base = AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32, **kwargs)
    return PeftModel.from_pretrained(base, run / "final").eval()


def merge(run: Path, out: Path, *args: str) -> dict:
    code, stdout, err = run_cli("merge", str(run), "--out", str(out), *args)
    assert code == 0, err
    assert stdout == ""
    return json.loads((out / "merge_report.json").read_text())


def assert_plain_model_without_lora(out: Path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as reader:
            assert not [k for k in reader.keys() if "lora_" in k]  # noqa: SIM118
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def lora_merged(trained_runs, tmp_path_factory) -> tuple[Path, Path, dict]:
    run = trained_runs["lora"]
    out = tmp_path_factory.mktemp("merge") / "lora-merged"
    return run, out, merge(run, out)


def test_lora_merge_equals_base_plus_adapter(lora_merged):
    from transformers import AutoModelForCausalLM

    run, out, report = lora_merged
    batch = val_batch(run)
    merged = logits(assert_plain_model_without_lora(out), batch)
    reference = logits(base_plus_adapter(run), batch)
    base = logits(AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32), batch)
    # fp32: W + sBA vs Wx + sB(Ax) differ by round-off only (documented tolerance 1e-4)
    assert (merged - reference).abs().max() <= 1e-4
    assert (merged - base).abs().max() > 1e-3  # the adapter is in there
    assert report["merge"]["passed"] and report["merge"]["max_abs_logit_diff"] <= 1e-4
    assert report["vs_trained"] is None  # merged into exactly the base it trained on
    assert report["merge_target"] == "the base in float32"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(report["files"])


@pytest.fixture(scope="module")
def qlora_merged(trained_runs, tmp_path_factory) -> tuple[Path, Path, dict]:
    run = trained_runs["qlora"]
    out = tmp_path_factory.mktemp("merge") / "qlora-merged"
    return run, out, merge(run, out)


def test_qlora_merge_into_16_bit_within_documented_tolerance(qlora_merged, tmp_path):
    from ftkit.commands.merge import TRAINED_VAL_LOSS_TOLERANCE

    run, out, report = qlora_merged
    assert "16/32-bit base" in report["merge_target"] and not report["from_quantized"]
    batch = val_batch(run)
    merged = logits(assert_plain_model_without_lora(out), batch)
    # the merge itself: against the same fp32 base + adapter (lm_head trained whole), fp32 tolerance
    assert (merged - logits(base_plus_adapter(run), batch)).abs().max() <= 1e-4
    # against the model as trained (NF4 base + adapter) only the val loss is held, to its tolerance
    trained = report["vs_trained"]
    assert trained["passed"] and abs(trained["val_loss_diff"]) <= TRAINED_VAL_LOSS_TOLERANCE
    assert (merged - logits(base_plus_adapter(run, quantized=True), batch)).abs().max() > 1e-3  # NF4 rounding

    exact = merge(run, tmp_path / "qdq", "--from-quantized", "--samples", "4")
    assert exact["from_quantized"] and "dequantized" in exact["merge_target"]
    assert exact["merge"]["max_abs_logit_diff"] <= 1e-4
    # merging into the weights it trained on lands closer to the trained model than the 16-bit base does
    assert exact["vs_trained"]["max_abs_logit_diff"] < trained["max_abs_logit_diff"]


def test_shard_by_shard_merge_equals_in_memory_merge(qlora_merged, tmp_path):
    """Over the memory budget the merge streams tensor by tensor (LoRA deltas and lm_head trained
    whole) and verifies with layers offloaded to disk; the weights equal the in-memory merge."""
    from safetensors.torch import load_file

    run, in_memory, _ = qlora_merged
    out = tmp_path / "streamed"
    report = merge(run, out, "--max-memory", "64KB", "--max-shard-size", "100KB", "--samples", "4")
    assert report["shard_by_shard"] and report["merge"]["passed"] and report["vs_trained"]["passed"]
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    expected = load_file(in_memory / "model.safetensors")
    streamed = {}
    for file in out.glob("model-*.safetensors"):
        streamed |= load_file(file)
    assert streamed.keys() == expected.keys()
    # the same float32 sums in the same order: bit-identical except where peft orders them differently
    assert max(float((streamed[k] - expected[k]).abs().max()) for k in expected) <= 1e-6


def test_refusals_leave_everything_untouched(trained_runs, lora_merged, tmp_path):
    run, out, _ = lora_merged
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for args, code, expected in (
        ((str(trained_runs["full"]), "--out", str(tmp_path / "x")), 2, "nothing to merge"),
        ((str(run), "--out", str(out)), 2, "--overwrite"),
        ((str(run), "--out", str(run / "final" / "merged")), 2, "overlaps the adapter"),
        ((str(run), "--out", str(tmp_path / "y"), "--checkpoint", "step-3"), 2, "step-4, step-8"),
        ((str(trained_runs["lora"] / "final"), "--out", str(tmp_path / "z"), "--from-quantized"), 2, "not 4-bit"),
    ):
        exit_code, stdout, err = run_cli("merge", *args)
        assert exit_code == code and stdout == "", err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_failed_verification_writes_nothing(lora_merged, tmp_path):
    run, _, _ = lora_merged
    out = tmp_path / "strict"
    code, stdout, err = run_cli("merge", str(run), "--out", str(out), "--tolerance", "1e-12", "--samples", "2")
    assert code == 1 and stdout == ""
    assert "verification failed" in err
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory


def test_overwrite_replaces_only_after_verification(lora_merged, tmp_path):
    run, _, _ = lora_merged
    out = tmp_path / "again"
    out.mkdir()
    (out / "old.txt").write_text("old")
    report = merge(run, out, "--overwrite", "--samples", "2")
    assert not (out / "old.txt").exists() and report["samples"] == 2


def test_adapter_recording_another_base_is_refused_unless_base_is_given(trained_runs, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(trained_runs["lora"], run, ignore=shutil.ignore_patterns("checkpoints", "eval-*"))
    config_file = run / "final" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    # another model that exists (a path that no longer exists is a moved run: tests/integration/test_moved_runs.py)
    other = tmp_path / "elsewhere"
    shutil.copytree(run / "base", other)
    config["base_model_name_or_path"] = str(other)
    config_file.write_text(json.dumps(config))
    code, stdout, err = run_cli("eval", str(run), "--no-generation")
    assert code == 2 and stdout == ""
    assert "elsewhere" in err and "--base" in err
    code, stdout, err = run_cli("eval", str(run), "--no-generation", "--json", "--base", str(run / "base"))
    assert code == 0, err
    assert json.loads(stdout)["tuned"]["loss"] > 0


def test_a_slightly_wrong_merge_is_refused(lora_merged, tmp_path, monkeypatch):
    """One merged tensor off by 1e-3 of its scale — a bug a merge could have, far below anything a
    glance at outputs would show — fails the relative check, and nothing is written."""
    from safetensors.torch import load_file, save_file

    from ftkit.commands import merge as merging

    real = merging._merge_in_memory

    def corrupted(*args, **kwargs):
        result = real(*args, **kwargs)
        staging = args[5]
        weights = load_file(staging / "model.safetensors")
        name = next(k for k in weights if k.endswith("q_proj.weight"))
        weights[name] = weights[name] + 1e-3 * weights[name].abs().max()
        save_file(weights, staging / "model.safetensors", metadata={"format": "pt"})
        return result

    monkeypatch.setattr(merging, "_merge_in_memory", corrupted)
    run, _, report = lora_merged
    out = tmp_path / "wrong"
    code, stdout, err = run_cli("merge", str(run), "--out", str(out))
    assert code == 1 and stdout == "", err
    assert "verification failed" in err and "of the logits' scale" in err
    assert not out.exists()
    assert report["merge"]["rel_logit_diff"] <= 1e-6  # the correct merge: round-off only
    # KL of fp32 log-softmaxes that agree to round-off: ~1e-8 (each log-prob carries ~1e-7 of rounding)
    assert report["merge"]["top1_agreement"] == 1.0 and report["merge"]["mean_kl"] < 1e-6
