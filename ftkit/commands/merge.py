"""`ftkit merge RUN --out DIR`: fold a LoRA-family adapter into its base, and prove the result.

The merged weight of every adapted linear layer is

    W' = W + s · B A,    s = alpha / r   (alpha / √r with use_rslora; per-layer r, alpha from rank/alpha_pattern)

and modules trained whole (`modules_to_save`) replace the base's. peft's `merge_and_unload`
does this in memory; `stream_merge` does the same tensor by tensor over the base's
safetensors shards when the model does not fit in memory.

What the base is merged into is explicit:
- LoRA: the base as trained, in `--dtype` (auto = bfloat16 on a bf16 GPU, else float32);
- QLoRA, default: the original 16/32-bit base weights reloaded in `--dtype`. The adapter
  learned on NF4-rounded weights, so this model differs from the trained one by the base's
  quantization error (usually harmless, sometimes not: peft #2321, #2105, #1080);
- QLoRA with `--from-quantized`: the NF4 weights dequantized to `--dtype`: exactly the
  weights the adapter trained on, rounding included.

Verification is part of the command. On N held-out examples (the run's validation set,
`--data`, or seeded random tokens when there is no data) it compares

    merge       the merged model, as saved and loaded back, against the same base + adapter
                unmerged: max |Δ logit| after centring each position, relative to the largest
                reference logit, ≤ MERGE_TOLERANCE[dtype] (float32: 5e-5); top-1 agreement and
                the KL divergence of the next-token distributions are reported beside it. This
                checks the merge itself.
    vs_trained  when the merge target differs from how the run loaded its base (a QLoRA run,
                or another dtype): the merged model against the model as trained; the logits
                differ by the base's rounding, so the gate is on validation loss:
                |Δ val_loss| ≤ TRAINED_VAL_LOSS_TOLERANCE nats.

Both figures go to `merge_report.json` in the output. Everything is written to a staging
directory beside `--out` and renamed into place only after the checks pass; a failure
leaves nothing behind. The adapter and the base are never touched.

Memory: the in-memory path holds one copy of the model in the merge dtype (parameters ×
4 bytes in float32, × 2 in bf16) plus the adapter; the reference models are loaded one
after the other and freed, so the peak stays ≈ 1× the model, not 2-3×. When that exceeds
`--max-memory` (default: 90% of available RAM) the merge streams: it holds one base tensor
and one output shard at a time (≈ `--max-shard-size` + the adapter), and the verification
models run with their layers offloaded to disk under the same budget.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ftkit.commands import medusa
from ftkit.commands.eval import load_eval_set
from ftkit.errors import ArgumentError, FtkitError, ModelError, VerificationError
from ftkit.io import check_out, messages, publish
from ftkit.methods.medusa_decode import is_medusa_target
from ftkit.models import bottleneck, hf_files
from ftkit.models.load import resolve_dtype
from ftkit.models.target import Target, attach_adapter, device_type, load_model, load_tokenizer
from ftkit.rundir import MEDUSA_MERGED_DIR
from ftkit.tasks import Task, task_of

#: max |Δ logit| between the merged model and base + adapter, relative to the logits' scale, by
#: merge dtype (`logit_agreement`). Logits are compared after centring each position (softmax
#: ignores a shift) and divided by the largest centred reference logit, so the gate means the same
#: for a 2-layer toy with logits ~1 and a 30-layer model with logits ~20. float32: W + sBA vs
#: Wx + sB(Ax) reassociate, and the round-off grows with depth: measured 4e-6 on SmolLM2-135M
#: (30 layers, |logit| ~20: 1.1e-4 absolute, which the old absolute 1e-4 refused), ~1e-7 on the
#: 2-layer built-ins; 5e-5 leaves 10x room and still catches one q_proj off by 1e-3 of its
#: scale (tests/integration/test_merge.py). float16 / bfloat16 keep 11 / 8 significant bits: the
#: merged weights round once more than W and BA apart (2^-11 / 2^-8 relative, 10x room).
MERGE_TOLERANCE = {"float32": 5e-5, "float16": 5e-3, "bfloat16": 4e-2}
#: |Δ val_loss| (nats) allowed between the merged model and the model as trained when the merge
#: target differs from the trained base (QLoRA into 16 bits). 0.02 nats ≈ 2% perplexity: below it
#: the merged model is as good as the adapter; above it, merge --from-quantized instead.
TRAINED_VAL_LOSS_TOLERANCE = 0.02
#: held-out examples the verification runs; enough to cover every layer with varied inputs
VERIFY_SAMPLES = 8
#: length of the random token sequences used when no data is at hand
SYNTHETIC_LENGTH = 64
REPORT_FILE = "merge_report.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int | None) -> int | None:
    """'2GB' / '500MB' / '1.5GiB' / '1024' → bytes (decimal and binary units both as powers of 1024)."""
    if text is None or isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ArgumentError(f"{text!r} is not a size; write it like 2GB, 500MB or 1048576")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** "_KMGT".index(unit or "_"))


@dataclass
class Scores:
    """Logits at every real (non-pad) position of the verification batch, and its val loss."""

    logits: Any
    loss: float


def merge_adapter(
    target: Target,
    out: str | Path,
    *,
    dtype: str = "auto",
    from_quantized: bool = False,
    overwrite: bool = False,
    samples: int = VERIFY_SAMPLES,
    data: str | None = None,
    fmt: str | None = None,
    max_memory: int | None = None,
    max_shard_size: int = 2 * 1024**3,
    tolerance: float | None = None,
    val_loss_tolerance: float = TRAINED_VAL_LOSS_TOLERANCE,
) -> dict:
    """Merge, verify, publish; return the report (also in OUT/merge_report.json). See the module docstring."""
    started = time.perf_counter()
    out = Path(out)
    quantized_run = target.model_cfg.quantization is not None
    with_heads = is_medusa_target(target)
    if with_heads:
        medusa.check_mergeable(target)
    _check_mergeable(target, from_quantized)
    check_out(out, overwrite, [("adapter", target.weights), ("base model", target.base)])
    merge_dtype = _dtype_name(resolve_dtype(dtype, device_type()))
    trained_dtype = _dtype_name(resolve_dtype(target.model_cfg.dtype, device_type()))
    tol = MERGE_TOLERANCE[merge_dtype] if tolerance is None else tolerance
    tokenizer = load_tokenizer(target)
    task = task_of(target)
    examples, sample_source = verification_examples(target, tokenizer, data, fmt, samples)
    budget = max_memory or int(0.9 * _available_ram())
    need = _estimate_bytes(target, merge_dtype)
    low_memory = need is not None and need > budget and not from_quantized
    if low_memory:
        why_not = streaming_unsupported(target, tokenizer)
        if why_not:
            raise ModelError(
                f"the model needs ~{_gb(need)} in {merge_dtype}, more than the {_gb(budget)} budget (--max-memory), "
                f"and it cannot be merged shard by shard: {why_not}"
            )
    if from_quantized:
        merge_target = f"the NF4 base dequantized to {merge_dtype} (the weights the adapter trained on)"
    elif quantized_run:
        merge_target = f"the 16/32-bit base reloaded in {merge_dtype} (not the NF4 weights the adapter trained on)"
    else:
        merge_target = f"the base in {merge_dtype}"
    _log(f"merging {target.describe()} into {merge_target}" + (", shard by shard" if low_memory else ""))

    trained = None
    if quantized_run or trained_dtype != merge_dtype:
        trained = _scores_of(lambda: _load_as_trained(target, tokenizer), examples, tokenizer, task)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    offload = out.parent / f".{out.name}.offload-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if staging.exists():
            shutil.rmtree(staging)
        if low_memory:
            base, unmerged = _reference_streamed(target, tokenizer, examples, merge_dtype, budget, offload, task)
            stream_merge(Path(target.base), Path(target.weights), staging, merge_dtype, max_shard_size)
        else:
            base, unmerged = _merge_in_memory(
                target, tokenizer, examples, merge_dtype, from_quantized, staging, max_shard_size, task
            )
        tokenizer.save_pretrained(staging)
        if with_heads:  # a medusa run: its heads beside the merged model, pointing at it
            medusa.write_heads(target, staging / MEDUSA_MERGED_DIR, str(out.resolve()))
        merged = _scores_of(
            lambda: _load_plain(staging, merge_dtype, budget if low_memory else None, offload),
            examples,
            tokenizer,
            task,
        )
        report = _report(
            target, out, merge_dtype, merge_target, from_quantized, low_memory, tol, val_loss_tolerance,
            examples, sample_source, base, unmerged, merged, trained, staging,
        )  # fmt: skip
        report["wall_s"] = time.perf_counter() - started
        report["peak_rss_bytes"] = _peak_rss()
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
        failures = _failures(report)
        if failures:
            hint = " Merge with --from-quantized to keep the weights it trained on." if quantized_run else ""
            raise VerificationError(f"merge verification failed, nothing written: {'; '.join(failures)}.{hint}")
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(offload, ignore_errors=True)
    return report


# ---------------------------------------------------------------- checks before any work


def _check_mergeable(target: Target, from_quantized: bool) -> None:
    if not target.is_adapter:
        what = f"the run trained every weight (method {target.recipe.method.name})" if target.recipe else "it"
        raise ModelError(
            f"{target.spec}: nothing to merge: {what}, so {target.weights} is already a standalone model "
            "(AutoModelForCausalLM.from_pretrained loads it); merge adapters, or use `ftkit merge --config` for models"
        )
    if target.bottleneck:
        raise ModelError(f"{target.spec}: cannot merge: {bottleneck.NOT_MERGEABLE}")
    kind = hf_files.peft_type(hf_files.adapter_config(Path(target.weights)))
    if kind in {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "ADAPTION_PROMPT", "CPT"}:
        raise ModelError(f"{target.weights}: a {kind} adapter adds tokens, it has no weights to merge")
    if from_quantized and target.model_cfg.quantization is None:
        raise ModelError("--from-quantized: the base of this adapter is not 4-bit; drop the flag")


def streaming_unsupported(target: Target, tokenizer: Any) -> str | None:
    """Why this adapter cannot be merged shard by shard (None when it can)."""
    if target.is_classifier:
        return "a classifier's head is built on load (its base is a language-model checkpoint), so it merges in memory"
    base = Path(target.base or "")
    if not base.is_dir() or not hf_files.has_weights(base):
        return f"the base {target.base} is not a local directory of safetensors shards"
    config = hf_files.adapter_config(Path(target.weights))
    kind = hf_files.peft_type(config)
    if kind != "LORA":
        return f"only plain LoRA streams ({kind} merges in memory)"
    for key, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layers")):
        if getattr(config, key, None):
            return f"{what} merges in memory only"
    if getattr(config, "target_parameters", None) or getattr(config, "trainable_token_indices", None):
        return "target_parameters / trainable_token_indices merge in memory only"
    vocab_size = getattr(hf_files.model_config(base), "vocab_size", None)
    if len(tokenizer) > int(vocab_size or len(tokenizer)):
        return "the tokenizer has more tokens than the base's embeddings (they are resized in memory)"
    return None


# ---------------------------------------------------------------- verification data and scoring


def verification_examples(
    target: Target, tokenizer: Any, data: str | None, fmt: str | None, n: int
) -> tuple[list[Any], str]:
    """First `n` held-out examples (run val set or --data, as `ftkit eval` reads them), else `n` seeded
    random token sequences as the target's task's examples."""
    if data is not None or target.recipe is not None:
        try:
            evalset = load_eval_set(target, tokenizer, data, fmt, n)
            return evalset.examples, evalset.label
        except FtkitError as err:
            if data is not None:
                raise
            _log(f"note: verifying on random tokens: the run's validation data cannot be used ({err})")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (n, SYNTHETIC_LENGTH), generator=generator).tolist()
    examples = task_of(target).synthetic_examples(ids)
    return examples, f"{n} random token sequences of length {SYNTHETIC_LENGTH} (seed 0; pass --data for real text)"


def logit_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """How closely `other` reproduces `reference` (positions × classes, float32):

    max_abs_logit_diff   max |Δ| of the logits as they are
    rel_logit_diff       max |Δ| of the centred logits / max |centred reference logit|
    top1_agreement       share of positions whose argmax is the same
    mean_kl              mean over positions of KL(softmax(reference) ‖ softmax(other)), nats
    """
    centred_ref = reference - reference.mean(dim=-1, keepdim=True)
    centred_other = other - other.mean(dim=-1, keepdim=True)
    scale = float(centred_ref.abs().max()) or 1.0
    kl = F.kl_div(F.log_softmax(other, dim=-1), F.log_softmax(reference, dim=-1), log_target=True, reduction="none")
    return {
        "max_abs_logit_diff": float((other - reference).abs().max()),
        "rel_logit_diff": float((centred_other - centred_ref).abs().max()) / scale,
        "top1_agreement": float((other.argmax(dim=-1) == reference.argmax(dim=-1)).float().mean()),
        "mean_kl": float(kl.sum(dim=-1).mean()),
    }


def score(model: Any, examples: list[Any], pad_id: int, task: Task) -> Scores:
    """What the merged model must reproduce: the task's outputs on `examples` and its loss."""
    logits, loss = task.score(model, examples, pad_id)
    return Scores(logits, loss)


def _scores_of(load: Any, examples: list[Any], tokenizer: Any, task: Task) -> Scores:
    """Load a model, score it, and free it before the next one is loaded (peak memory ≈ one model)."""
    model = load()
    try:
        return score(model, examples, tokenizer.pad_token_id, task)
    finally:
        del model
        gc.collect()


# ---------------------------------------------------------------- the two merge paths


def _load_as_trained(target: Target, tokenizer: Any) -> Any:
    return load_model(target, tokenizer)


def _merge_in_memory(
    target: Target,
    tokenizer: Any,
    examples: list[Any],
    dtype: str,
    from_quantized: bool,
    staging: Path,
    max_shard_size: int,
    task: Task,
) -> tuple[Scores, Scores]:
    """peft's merge_and_unload on the merge target; returns (base, base + adapter unmerged) scores."""
    if from_quantized:
        model = load_model(target, tokenizer, base_only=True).dequantize(dtype=getattr(torch, dtype))
    else:
        model = load_model(target, tokenizer, dtype=dtype, quantized=False, base_only=True)
    model.eval()
    base = score(model, examples, tokenizer.pad_token_id, task)
    model = attach_adapter(model, target.weights)
    unmerged = score(model, examples, tokenizer.pad_token_id, task)
    model = model.merge_and_unload()
    model.config.dtype = getattr(torch, dtype)
    model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
    del model
    gc.collect()
    return base, unmerged


def _load_plain(path: Path, dtype: str, budget: int | None, offload: Path) -> Any:
    """A model directory as a user loads it (AutoModelForCausalLM, or AutoModelForSequenceClassification
    for a classifier), with layers offloaded to disk beyond `budget`."""
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if budget is not None:
        offload.mkdir(parents=True, exist_ok=True)
        kwargs |= {"device_map": "auto", "max_memory": {"cpu": budget}, "offload_folder": str(offload)}
    is_classifier = hf_files.is_classifier_architecture(hf_files.architectures(path))
    model = (AutoModelForSequenceClassification if is_classifier else AutoModelForCausalLM).from_pretrained(
        path, **kwargs
    )
    if budget is None:
        model = model.to(device_type())
    return model.eval()


def _reference_streamed(
    target: Target, tokenizer: Any, examples: list[Any], dtype: str, budget: int, offload: Path, task: Task
) -> tuple[Scores, Scores]:
    """(base, base + adapter) scores with the base offloaded beyond `budget`.

    peft cannot wrap a disk-offloaded model, so the adapter is applied by forward hooks
    that add s · B (A x) to each adapted layer's output and run trained-whole modules with
    their saved weights: an independent implementation of the formula the merge bakes in.
    """
    model = _load_plain(Path(target.base), dtype, budget, offload)
    try:
        base = score(model, examples, tokenizer.pad_token_id, task)
        with lora_hooks(model, Path(target.weights)):
            unmerged = score(model, examples, tokenizer.pad_token_id, task)
    finally:
        del model
        gc.collect()
    return base, unmerged


@contextlib.contextmanager
def lora_hooks(model: Any, adapter_dir: Path) -> Iterator[None]:
    """Apply a plain LoRA adapter to `model` through forward hooks (see `_reference_streamed`)."""
    deltas, whole = read_lora(adapter_dir)
    handles = []
    try:
        for module_name, (a, b, scale) in deltas.items():
            module = model.get_submodule(module_name)

            def add_delta(mod: Any, args: tuple, output: Any, a=a, b=b, scale=scale) -> Any:
                x = args[0]
                return output + scale * F.linear(F.linear(x.to(a.dtype), a), b).to(output.dtype)

            handles.append(module.register_forward_hook(add_delta))
        for module_name, weights in _group_whole(whole).items():
            module = model.get_submodule(module_name)
            if isinstance(module, torch.nn.Embedding):

                def embed(mod: Any, args: tuple, output: Any, w=weights) -> Any:
                    return F.embedding(args[0], w["weight"].to(output.dtype), mod.padding_idx)

                handles.append(module.register_forward_hook(embed))
            elif isinstance(module, torch.nn.Linear):

                def linear(mod: Any, args: tuple, output: Any, w=weights) -> Any:
                    bias = w.get("bias")
                    return F.linear(
                        args[0], w["weight"].to(output.dtype), None if bias is None else bias.to(output.dtype)
                    )

                handles.append(module.register_forward_hook(linear))
            else:
                raise ModelError(f"{adapter_dir}: module {module_name} ({type(module).__name__}) cannot be streamed")
        yield
    finally:
        for handle in handles:
            handle.remove()


def read_lora(adapter_dir: Path) -> tuple[dict[str, tuple[Any, Any, float]], dict[str, Any]]:
    """({module: (A, B, s)}, {base tensor name: tensor}) of a saved plain-LoRA adapter, in float32.

    s = alpha / r, or alpha / √r with use_rslora; r and alpha follow rank_pattern / alpha_pattern
    (matched as peft does: the pattern is the module name or a dotted suffix of it).
    """
    config = hf_files.adapter_config(adapter_dir)
    tensors = hf_files.load_tensors(adapter_dir)
    prefix = "base_model.model."
    pairs: dict[str, dict[str, Any]] = {}
    whole: dict[str, Any] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(prefix)
        match = re.match(r"^(.*)\.lora_([AB])\.weight$", name)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor.to(torch.float32)
        else:
            whole[name] = tensor
    deltas = {}
    for module, pair in pairs.items():
        r = int(_pattern_value(config.rank_pattern or {}, module, config.r))
        alpha = float(_pattern_value(config.alpha_pattern or {}, module, config.lora_alpha))
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        deltas[module] = (pair["A"], pair["B"], scale)
    return deltas, whole


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _group_whole(whole: dict[str, Any]) -> dict[str, dict[str, Any]]:
    grouped: dict[str, dict[str, Any]] = {}
    for name, tensor in whole.items():
        module, _, param = name.rpartition(".")
        grouped.setdefault(module, {})[param] = tensor
    return grouped


def stream_merge(base_dir: Path, adapter_dir: Path, out: Path, dtype: str, max_shard_size: int) -> list[Path]:
    """Write base + adapter merged into `out`, one tensor at a time, in shards of ≤ max_shard_size bytes.

    Memory: one base tensor, its delta, and the output shard being filled, plus the adapter.
    """
    deltas, whole = read_lora(adapter_dir)
    wanted = {f"{module}.weight" for module in deltas} | set(whole)
    target_dtype = getattr(torch, dtype)
    base = hf_files.Weights(base_dir)
    seen: set[str] = set()

    def merged() -> Iterator[tuple[str, Any]]:
        for name in base.names:
            tensor = base.get(name)
            module = name.removesuffix(".weight")
            if name in whole:
                if whole[name].shape != tensor.shape:
                    raise ModelError(
                        f"{adapter_dir}: {name} has shape {tuple(whole[name].shape)}, "
                        f"the base's is {tuple(tensor.shape)}"
                    )
                tensor = whole[name]
            elif name.endswith(".weight") and module in deltas:
                a, b, scale = deltas[module]
                tensor = tensor.to(torch.float32) + scale * (b @ a)
            seen.add(name)
            yield name, tensor.to(target_dtype)

    layout = {name: base.meta(name).to(target_dtype) for name in base.names}
    files = hf_files.save_sharded(layout, out, max_shard_size, tensors=merged())
    missing = sorted(wanted - seen)
    if missing:
        raise ModelError(f"{adapter_dir}: the adapter changes {missing[0]}, which the base {base_dir} does not have")
    hf_files.copy_model_config(base_dir, out, dtype)
    return files


# ---------------------------------------------------------------- report and publishing


def _report(
    target: Target,
    out: Path,
    dtype: str,
    merge_target: str,
    from_quantized: bool,
    low_memory: bool,
    tol: float,
    val_loss_tol: float,
    examples: list[Any],
    sample_source: str,
    base: Scores,
    unmerged: Scores,
    merged: Scores,
    trained: Scores | None,
    staging: Path,
) -> dict:
    agreement = logit_agreement(unmerged.logits, merged.logits)
    report: dict[str, Any] = {
        "adapter": target.weights,
        "base": target.base,
        "out": str(out),
        "dtype": dtype,
        "merge_target": merge_target,
        "from_quantized": from_quantized,
        "shard_by_shard": low_memory,
        "samples": len(examples),
        "sample_source": sample_source,
        "merge": {
            **agreement,
            "tolerance": tol,
            "val_loss_merged": merged.loss,
            "val_loss_unmerged": unmerged.loss,
            "val_loss_diff": merged.loss - unmerged.loss,
            "passed": agreement["rel_logit_diff"] <= tol,
        },
        "vs_trained": None,
        "max_abs_logit_change_vs_base": float((merged.logits - base.logits).abs().max()),
        "val_loss_base": base.loss,
        "lora_keys_in_output": _lora_keys(staging),
        "files": sorted(p.name for p in staging.iterdir() if p.is_file()) + [REPORT_FILE],
        "bytes": sum(p.stat().st_size for p in staging.iterdir() if p.is_file()),
    }
    if trained is not None:
        diff = merged.loss - trained.loss
        report["vs_trained"] = {
            **logit_agreement(trained.logits, merged.logits),
            "val_loss_trained": trained.loss,
            "val_loss_merged": merged.loss,
            "val_loss_diff": diff,
            "val_loss_tolerance": val_loss_tol,
            "passed": abs(diff) <= val_loss_tol,
        }
    return report


def _failures(report: dict) -> list[str]:
    failures = []
    merge = report["merge"]
    if not merge["passed"]:
        failures.append(
            f"merged vs base + adapter: max |Δ logit| {merge['rel_logit_diff']:.3g} of the logits' scale > "
            f"{merge['tolerance']:g} (top-1 agreement {merge['top1_agreement']:.1%}, KL {merge['mean_kl']:.2e})"
        )
    trained = report["vs_trained"]
    if trained is not None and not trained["passed"]:
        failures.append(
            f"merged vs the model as trained: |Δ val_loss| {abs(trained['val_loss_diff']):.4f} > "
            f"{trained['val_loss_tolerance']:g} nats"
        )
    if report["lora_keys_in_output"]:
        failures.append(f"the output still holds LoRA tensors ({report['lora_keys_in_output'][0]} ...)")
    return failures


def _lora_keys(directory: Path) -> list[str]:
    return [name for name in hf_files.tensor_names(directory) if "lora_" in name]


def summary_line(report: dict) -> str:
    merge, trained = report["merge"], report["vs_trained"]
    line = (
        f"merged into {report['merge_target']} → {report['out']} · verified on {report['samples']} samples: "
        f"max |Δ logit| vs base + adapter {merge['rel_logit_diff']:.2e} of the logits' scale "
        f"(≤ {merge['tolerance']:g}), top-1 agreement {merge['top1_agreement']:.1%}, KL {merge['mean_kl']:.1e}"
    )
    if trained is not None:
        line += (
            f", vs the model as trained {trained['max_abs_logit_diff']:.2e}, "
            f"Δ val_loss {trained['val_loss_diff']:+.4f} (|·| ≤ {trained['val_loss_tolerance']:g})"
        )
    return line + f" · {report['wall_s']:.1f}s"


# ---------------------------------------------------------------- small helpers


def _estimate_bytes(target: Target, dtype: str) -> int | None:
    """Parameters of the base (from its safetensors headers) × bytes per parameter in `dtype`."""
    base = Path(target.base or "")
    if not base.is_dir() or not hf_files.has_weights(base):
        return None
    weights = hf_files.Weights(base)
    return sum(math.prod(weights.shape(name)) for name in weights.names) * _dtype_bytes(dtype)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _available_ram() -> int:
    return int(psutil.virtual_memory().available)


def _peak_rss() -> int | None:
    try:
        import resource  # Unix only: absent on Windows, where the figure is None

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    except (ImportError, OSError):
        return None


def _gb(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def _log(message: str) -> None:
    print(message, file=messages(), flush=True)
