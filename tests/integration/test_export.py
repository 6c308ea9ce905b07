"""`ftkit export RUN --gguf FILE`: the file holds the merged model (read back independently here, with
gguf's reader and transformers' GGUF loader), refusals are one line and exit 2, and a failure leaves nothing."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ftkit.commands import export as export_command
from ftkit.models.builtin import build_byte_tokenizer
from tests.support.helpers import run_cli


def _read_back(path: Path):
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_a_lora_run_exports_as_its_merged_model(trained_runs, tmp_path):
    run, out = trained_runs["lora"], tmp_path / "lora.gguf"
    code, stdout, err = run_cli("export", str(run), "--gguf", str(out), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["merge"]["passed"] and report["read_back"]["max_abs_logit_diff"] <= 1e-3
    assert report["tokenizer"]["same_ids"] == report["tokenizer"]["texts"] >= 4 + 2 * 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.gguf"]  # no staging left behind

    reader = gguf.GGUFReader(str(out))
    tokenizer = build_byte_tokenizer()
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.attn_q.weight"] == "F16"

    # independently of ftkit: base + adapter folded by peft, against what transformers reads from the file
    base = LlamaForCausalLM.from_pretrained(run / "base", dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, run / "final").merge_and_unload().eval()
    read, read_tokenizer = _read_back(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "A red cube of size 7."}], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert read_tokenizer(text, add_special_tokens=False).input_ids == ids
    with torch.no_grad():
        expected, got = merged(torch.tensor([ids])).logits, read(torch.tensor([ids])).logits
    # f16 keeps 11 significant bits of each weight: logits move by ~1e-3 of their scale on this model
    assert (got - expected).abs().max() <= 5e-3 * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_a_full_run_exports_in_q8_0(trained_runs, tmp_path):
    out = tmp_path / "full.gguf"
    code, stdout, err = run_cli("export", str(trained_runs["full"]), "--gguf", str(out), "--type", "q8_0", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["merge"] is None and report["tensors"]["Q8_0"] == 2 * 7 + 2  # 7 linears per layer, embed, head
    assert report["vs_float32"]["rel_logit_diff"] <= export_command.TYPE_TOLERANCE["q8_0"]
    assert "wrote" in err and "q8_0" in err


def _model_dir(tmp_path: Path, model) -> Path:
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("exists", "already exists; pass --overwrite"),
        ("directory", "is a directory"),
        ("not-llama", "a gpt2 model: export --gguf maps the Llama layout"),
        ("q8_0-rows", "--type q8_0: model.embed_tokens.weight has rows of 48 values, not a multiple of 32"),
    ],
)
def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, case, says):
    tokenizer = build_byte_tokenizer()
    if case == "not-llama":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    else:
        hidden = 48 if case == "q8_0-rows" else 64
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        model = LlamaForCausalLM(config)
    folder = _model_dir(tmp_path, model)
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    if case == "exists":
        out.write_text("keep me")
    target = out.parent if case == "directory" else out
    before = sorted(p.name for p in out.parent.iterdir())
    code, stdout, err = run_cli("export", str(folder), "--gguf", str(target), "--type", "q8_0")
    assert (code, stdout) == (2, "")
    assert err.count("\n") == 1 and says in err, err
    assert sorted(p.name for p in out.parent.iterdir()) == before
    if case == "exists":
        assert out.read_text() == "keep me"


def test_a_failed_verification_leaves_nothing(trained_runs, tmp_path, monkeypatch):
    out = tmp_path / "full.gguf"
    out.write_text("the old file")
    monkeypatch.setitem(export_command.TYPE_TOLERANCE, "f16", 0.0)  # no f16 file is that exact
    code, _, err = run_cli("export", str(trained_runs["full"]), "--gguf", str(out), "--overwrite")
    assert code == 1
    assert "export verification failed, nothing written: f16 vs float32" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.gguf"] and out.read_text() == "the old file"


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0"])
def test_smollm2_exports_with_its_bpe_tokenizer_and_chat_template(smollm2, tmp_path, qtype):
    """The real model: 49,152-token BPE with merges, ChatML template, tied embeddings, 30 layers."""
    out = tmp_path / "smollm2.gguf"
    args = ["--gguf", str(out), "--type", qtype, "--data", "data/quickstart/val.jsonl", "--json"]
    code, stdout, err = run_cli("export", str(smollm2), *args)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["read_back"]["max_abs_logit_diff"] <= 1e-3
    assert report["tokenizer"]["same_ids"] == report["tokenizer"]["texts"] and report["tokenizer"]["chat_template"]
    assert report["vs_float32"]["top1_agreement"] >= 0.95
    reader = gguf.GGUFReader(str(out))
    assert len(_field(reader, "tokenizer.ggml.merges")) > 40_000
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd
