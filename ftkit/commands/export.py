"""`ftkit export RUN --gguf out.gguf [--type f16|bf16|q8_0]`: a run's model as one GGUF file, proven.

    1. the model    an adapter is merged first by `ftkit merge`'s own code path (`merge_adapter`:
                    folded in float32 and verified against base + adapter) into a staging folder;
                    a full fine-tune's weights (final/ or a model folder) are used as they are
    2. the file     written by `ftkit.models.gguf_writer` beside --gguf (`.NAME.tmp-PID`)
    3. verified     the file read back with transformers' GGUF loader (`from_pretrained(gguf_file=)`)
                    and compared on held-out examples (the run's validation set, --data, or seeded
                    random tokens):
                      read_back   its logits against the merged model with its weights rounded exactly
                                  as the file stores them (gguf's own quantize → dequantize):
                                  max |Δ logit| ≤ READ_BACK_TOLERANCE. This proves the layout (names,
                                  q/k permutation, metadata, tied head): nothing but --type changes.
                      vs_float32  against the float32 merged model: what --type costs, max |Δ logit|
                                  relative to the logits' scale ≤ TYPE_TOLERANCE[--type], with top-1
                                  agreement and KL beside it
                      tokenizer   the file's tokenizer encodes every prompt (the examples' rendered
                                  prompts and answers, and fixed texts with non-ASCII and special
                                  tokens) to the same ids as the model's own, and carries its chat template
    4. published    renamed onto --gguf only when every check passed; a failure leaves nothing behind

Refused before any work (one line, exit 2): --gguf naming an existing file without --overwrite or a
directory, a classifier, and what the file cannot hold (`gguf_writer.export_problems`).
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ftkit.commands.eval import load_eval_set
from ftkit.commands.merge import logit_agreement, merge_adapter, score, verification_examples
from ftkit.data import render_prompt
from ftkit.errors import FtkitError, ModelError, RunDirError, VerificationError
from ftkit.io import messages
from ftkit.models import bottleneck, gguf_writer
from ftkit.models.gguf import local_model
from ftkit.models.target import Target, load_tokenizer
from ftkit.tasks import task_of

#: max |Δ logit| between the file read back and the merged model rounded as the file stores it. Both run the
#: same float32 computation on the same weights, so any difference is a layout error, not round-off
#: (measured: 0.0 on the built-ins and SmolLM2); 1e-3 is the issue's bound.
READ_BACK_TOLERANCE = 1e-3
#: max |Δ logit| vs the float32 merged model, relative to the largest centred logit (merge's `rel_logit_diff`),
#: by --type. f16 keeps 11 significant bits, bf16 8 (merge's bf16 gate: 4e-2); q8_0 stores each block of 32
#: weights as int8 × one f16 scale (~7 bits relative to the block's largest). Measured on SmolLM2-135M (30
#: layers, tied embeddings) on 8 quickstart val rows: f16 9.2e-4, bf16 6.5e-3, q8_0 2.9e-2 (top-1 agreement
#: 99.8 / 99.5 / 97.0%, val_loss +0.001 / -0.004 / +0.019 nats); each bound leaves ≥ 3× room over it.
TYPE_TOLERANCE = {"f16": 5e-3, "bf16": 4e-2, "q8_0": 1e-1}
#: texts every export's tokenizer must encode to the same ids, whatever the data: ASCII, accents, CJK, emoji
FIXED_TEXTS = ("Hello, world!", "  two spaces\tand a tab\nnew line", "Größe: 12 €, naïve café", "日本語のテキスト 🙂")


def export_gguf(
    target: Target,
    out: str | Path,
    qtype: str = "f16",
    *,
    overwrite: bool = False,
    samples: int = 8,
    data: str | None = None,
) -> dict:
    """Merge (when an adapter), write, verify and publish `out`; return the report. See the module docstring."""
    started = time.perf_counter()
    out = Path(out)
    _check_out(out, overwrite)
    if qtype not in gguf_writer.TYPES:
        raise ModelError(f"--type: {qtype} is not a GGUF type ftkit writes; use one of {', '.join(gguf_writer.TYPES)}")
    if target.is_classifier:
        raise ModelError(f"{target.spec}: a sequence classifier; GGUF holds language models (llama.cpp generates text)")
    if target.bottleneck:
        raise ModelError(f"{target.spec}: cannot export: {bottleneck.NOT_MERGEABLE}")
    tokenizer = load_tokenizer(target)
    problems = gguf_writer.export_problems(_skeleton(target), tokenizer, qtype)
    if problems:
        raise ModelError(f"export --gguf: {'; '.join(problems)}")

    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    merged_dir = out.parent / f".{out.name}.merged-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        merge_report = None
        if target.is_adapter:
            _log(f"merging {target.describe()} in float32 before export")
            merge_report = merge_adapter(target, merged_dir, dtype="float32", samples=samples, data=data)
            model_dir = merged_dir
        else:
            model_dir = Path(local_model(target.model_cfg).name)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        _log(f"writing {out} ({qtype})")
        counts = gguf_writer.write_gguf(model, tokenizer, staging, qtype, name=_model_name(target))
        if not gguf_writer.tokenizer_fields(tokenizer, model.config.vocab_size)["merges"]:
            _log(
                "note: this tokenizer has no BPE merges (the built-ins' byte tokenizer); gguf cannot write an empty "
                "merge list, so transformers reads the file but llama.cpp refuses its tokenizer"
            )
        report = _verify(target, model, tokenizer, staging, qtype, samples, data)
        report |= {
            "source": target.describe(),
            "out": str(out),
            "type": qtype,
            "bytes": staging.stat().st_size,
            "tensors": counts,
            "merge": None if merge_report is None else merge_report["merge"],
        }
        report["wall_s"] = time.perf_counter() - started
        failures = _failures(report)
        if failures:
            raise VerificationError(f"export verification failed, nothing written: {'; '.join(failures)}")
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
        shutil.rmtree(merged_dir, ignore_errors=True)
    return report


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise RunDirError(f"--gguf: {out} is a directory; give the file to write (e.g. {out}/model.gguf)")
    if out.suffix.lower() != ".gguf":
        raise RunDirError(f"--gguf: {out} does not end in .gguf; name the file NAME.gguf")
    if out.exists() and not overwrite:
        raise RunDirError(f"--gguf: {out} already exists; pass --overwrite to replace it, or choose another file")


def _skeleton(target: Target) -> Any:
    """The model's shapes without its weights (meta device), for the checks before any work."""
    source = target.base if target.is_adapter else target.weights
    cfg = target.model_cfg.model_copy(update={"name": source})
    try:
        config = AutoConfig.from_pretrained(local_model(cfg).name)
    except (OSError, ValueError) as err:
        raise ModelError(f"{source}: cannot read its config.json ({str(err).splitlines()[0]})") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _model_name(target: Target) -> str:
    if target.run_dir is not None:
        return f"{target.run_dir.name} ({target.checkpoint})"
    return Path(target.weights).name


def _verify(target: Target, model: Any, tokenizer: Any, path: Path, qtype: str, samples: int, data: str | None) -> dict:
    """The file against the model it was written from (module docstring, step 3)."""
    task = task_of(target)
    examples, source = verification_examples(target, tokenizer, data, None, samples)
    pad = tokenizer.pad_token_id
    full = score(model, examples, pad, task)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(gguf_writer.as_stored(parameter, qtype))
    as_stored = score(model, examples, pad, task)
    del model
    gc.collect()
    _log(f"reading {path.name} back with transformers' GGUF loader")
    try:
        read_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        read_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise VerificationError(
            f"export verification failed, nothing written: transformers cannot read the file back "
            f"({str(err).splitlines()[0]})"
        ) from None
    read = score(read_model.eval(), examples, pad, task)
    del read_model
    gc.collect()
    texts = _texts(target, tokenizer, data, samples)
    same = [_ids(tokenizer, text) == _ids(read_tokenizer, text) for text in texts]
    return {
        "samples": len(examples),
        "sample_source": source,
        "read_back": {
            "max_abs_logit_diff": float((read.logits - as_stored.logits).abs().max()),
            "tolerance": READ_BACK_TOLERANCE,
        },
        "vs_float32": {
            **logit_agreement(full.logits, read.logits),
            "tolerance": TYPE_TOLERANCE[qtype],
            "val_loss_float32": full.loss,
            "val_loss_gguf": read.loss,
        },
        "tokenizer": {
            "texts": len(texts),
            "same_ids": sum(same),
            "first_different": next((text for text, ok in zip(texts, same, strict=True) if not ok), None),
            "chat_template": read_tokenizer.chat_template == tokenizer.chat_template,
        },
    }


def _texts(target: Target, tokenizer: Any, data: str | None, n: int) -> list[str]:
    """Prompts and answers of the held-out rows as the model sees them (templates, special tokens), and FIXED_TEXTS."""
    texts = list(FIXED_TEXTS)
    if data is not None or target.recipe is not None:
        try:
            evalset = load_eval_set(target, tokenizer, data, None, n)
        except FtkitError:
            return texts
        for row in evalset.rows:
            prompt, answer = render_prompt(row, evalset.fmt, tokenizer)
            texts += [prompt, prompt + answer]
    return texts


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _failures(report: dict) -> list[str]:
    failures = []
    read_back, full, tok = report["read_back"], report["vs_float32"], report["tokenizer"]
    if not read_back["max_abs_logit_diff"] <= read_back["tolerance"]:
        failures.append(
            f"read back vs the merged model as stored: max |Δ logit| {read_back['max_abs_logit_diff']:.3g} > "
            f"{read_back['tolerance']:g}"
        )
    if not full["rel_logit_diff"] <= full["tolerance"]:
        failures.append(
            f"{report['type']} vs float32: max |Δ logit| {full['rel_logit_diff']:.3g} of the logits' scale > "
            f"{full['tolerance']:g} (top-1 agreement {full['top1_agreement']:.1%})"
        )
    if tok["same_ids"] != tok["texts"]:
        failures.append(f"the file's tokenizer encodes {tok['first_different']!r} to other ids")
    if not tok["chat_template"]:
        failures.append("the file's chat template differs from the tokenizer's")
    return failures


def summary_line(report: dict) -> str:
    full, tok = report["vs_float32"], report["tokenizer"]
    tensors = ", ".join(f"{n} {kind}" for kind, n in sorted(report["tensors"].items()))
    return (
        f"wrote {report['out']} ({report['type']}, {report['bytes'] / 1e6:.1f} MB; tensors: {tensors}) · read back on "
        f"{report['samples']} samples: max |Δ logit| {report['read_back']['max_abs_logit_diff']:.2g} vs the model "
        f"as stored, {full['rel_logit_diff']:.2e} of the logits' scale vs float32 (≤ {full['tolerance']:g}; "
        f"top-1 {full['top1_agreement']:.1%}) · tokenizer: {tok['same_ids']}/{tok['texts']} texts same ids · "
        f"{report['wall_s']:.1f}s"
    )


def _log(message: str) -> None:
    print(message, file=messages(), flush=True)
