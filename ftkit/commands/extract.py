"""`ftkit extract --base BASE --tuned FULL_FT --rank r --out DIR`: a LoRA adapter from a full fine-tune.

For every linear layer (lm_head included, unless it is tied to the embedding, whose change is then
reported with the embedding) the weight delta is factored by SVD:

    Δ = W_tuned − W_base = U S Vᵀ,   B = U_r √S_r,   A = √S_r V_rᵀ,   so B A = U_r S_r V_rᵀ

the best rank-r approximation of Δ in the Frobenius norm (Eckart–Young). With lora_alpha = r
peft's scale alpha / r is 1, so base + adapter applies W_base + B A. The rank is `--rank`
(capped at min(out, in) of each layer; r = min(out, in) reproduces Δ exactly) or, with
`--energy e`, per layer the smallest r whose retained energy Σ_{i≤r} s_i² / Σ s_i² reaches e
(peft's rank_pattern / alpha_pattern carry the per-layer ranks). Layers whose delta is
exactly zero get no adapter.

Tensors that are not linear weights (embeddings, norms) are not captured; the report lists
the ones that changed with their relative change ‖Δ‖ / ‖W‖, and `--keep-other` saves those
modules whole (peft's modules_to_save) so base + adapter reproduces the fine-tune.

The report (`extract_report.json` in the adapter, summary on stderr) gives each layer's rank
and retained energy, and — on the tuned run's validation set or `--data` — the val loss of
the base, of base + extracted adapter (loaded back with PeftModel.from_pretrained), and of
the full fine-tune.
"""

from __future__ import annotations

import gc
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftkit.commands.eval import load_eval_set
from ftkit.errors import ArgumentError, DataError, ModelError
from ftkit.io import check_out, messages, publish
from ftkit.models import hf_files
from ftkit.models.hf_files import Weights, check_same_architecture
from ftkit.models.target import Target, attach_adapter, device_type, load_model, load_tokenizer, resolve_target
from ftkit.tasks.causal_lm import full_logits_sft
from ftkit.tasks.objective import evaluate

REPORT_FILE = "extract_report.json"
#: ‖Δ‖ / ‖W‖ below this counts as unchanged (float32 round-off of a saved and reloaded tensor is ~1e-7)
UNCHANGED_REL = 1e-6


def extract_lora(
    base: str | None,
    tuned: str,
    out: str | Path,
    *,
    rank: int | None = 16,
    energy: float | None = None,
    keep_other: bool = False,
    overwrite: bool = False,
    data: str | None = None,
    fmt: str | None = None,
    max_samples: int | None = None,
) -> dict:
    """Write the extracted adapter to `out` (staged, then renamed) and return the report."""
    if (rank is None) == (energy is None):
        raise ArgumentError("give exactly one of --rank and --energy")
    started = time.perf_counter()
    out = Path(out)
    tuned_target = resolve_target(tuned)
    if tuned_target.is_adapter:
        raise ModelError(f"--tuned: {tuned} is already an adapter; extract works on a full fine-tune")
    base = base or (tuned_target.base if tuned_target.run_dir is not None else None)
    if base is None:
        raise ModelError(f"--base: {tuned} is not a run that records its base; pass --base MODEL")
    base_target = resolve_target(base)
    if base_target.is_adapter:
        raise ModelError(f"--base: {base} is an adapter; give the base model it sits on")
    check_out(out, overwrite, [("tuned model", tuned_target.weights), ("base model", base_target.weights)])
    tuned_tensors = Weights(Path(tuned_target.weights), "--tuned")
    check_same_architecture(Weights(Path(base_target.weights), "--base"), tuned_tensors)

    tokenizer = load_tokenizer(tuned_target)
    model = load_model(base_target, tokenizer, dtype="float32")
    factors, layers, others = {}, [], []
    # a weight tied to another (SmolLM2's lm_head is its embedding) is not stored on its own: its change
    # is the other tensor's, captured there
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and f"{name}.weight" not in tied:
                delta = tuned_tensors.get(f"{name}.weight").to(torch.float32) - module.weight.to(torch.float32)
                layer = factor(delta, rank, energy)
                layers.append({"module": name, "shape": list(delta.shape), **layer.pop("figures")})
                if layer["r"]:
                    factors[name] = layer
        linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        for name, param in model.state_dict().items():
            if name in linear_weights or name in tied or not param.is_floating_point():
                continue
            delta = tuned_tensors.get(name).to(torch.float32) - param.to(torch.float32)
            rel = float(delta.norm() / param.to(torch.float32).norm().clamp_min(1e-12))
            if rel > UNCHANGED_REL:
                others.append({"tensor": name, "relative_change": rel})
    if not factors:
        raise ModelError(f"--tuned: {tuned} has the same linear weights as {base}; there is nothing to extract")
    ranks = {name: f["r"] for name, f in factors.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    other_modules = sorted({o["tensor"].rpartition(".")[0] for o in others}) if keep_other else None
    config = LoraConfig(
        r=common,
        lora_alpha=common,
        target_modules=sorted(factors),
        rank_pattern={n: r for n, r in ranks.items() if r != common},
        alpha_pattern={n: r for n, r in ranks.items() if r != common},
        modules_to_save=other_modules,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, f in factors.items():
                layer = peft_model.base_model.model.get_submodule(name)
                layer.lora_A["default"].weight.copy_(f["A"])
                layer.lora_B["default"].weight.copy_(f["B"])
            for module_name in other_modules or []:
                wrapper = peft_model.base_model.model.get_submodule(module_name)
                for param_name, param in wrapper.modules_to_save["default"].named_parameters():
                    param.copy_(tuned_tensors.get(f"{module_name}.{param_name}"))
        peft_model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        hf_files.point_adapter_to(staging, base_target.weights)
        del peft_model, model
        gc.collect()
        report = {
            "base": base_target.weights,
            "tuned": tuned_target.weights,
            "out": str(out),
            "rank": rank,
            "energy": energy,
            "adapter_r": common,
            "layers": layers,
            "mean_retained_energy": sum(layer["retained_energy"] for layer in layers) / len(layers),
            "not_captured" if not keep_other else "saved_whole": others,
            "adapter_bytes": sum(p.stat().st_size for p in hf_files.weight_files(staging)),
        }
        report |= _val_losses(base_target, tuned_target, staging, tokenizer, data, fmt, max_samples)
        report["wall_s"] = time.perf_counter() - started
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def factor(delta: Any, rank: int | None, energy: float | None) -> dict:
    """{"r", "A", "B", "figures"} of the truncated SVD of `delta` (see the module docstring)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    power = s.square()
    total = float(power.sum())
    if total == 0.0:
        return {"r": 0, "figures": {"r": 0, "retained_energy": 1.0, "delta_norm": 0.0}}
    cumulative = torch.cumsum(power, 0) / total
    # the 1e-7 slack keeps energy 1.0 reachable despite float32 round-off in the cumulative sum
    r = int(torch.searchsorted(cumulative, torch.tensor(energy * (1 - 1e-7)))) + 1 if energy is not None else rank
    r = max(1, min(r, s.numel()))
    root = s[:r].sqrt()
    figures = {"r": r, "retained_energy": float(cumulative[r - 1]), "delta_norm": total**0.5}
    return {"r": r, "B": u[:, :r] * root, "A": root[:, None] * vh[:r], "figures": figures}


def _val_losses(
    base_target: Target,
    tuned_target: Target,
    adapter_dir: Path,
    tokenizer: Any,
    data: str | None,
    fmt: str | None,
    n: int | None,
) -> dict:
    """Val loss of base, base + extracted adapter (as saved) and the full fine-tune, one model at a time."""
    if data is None and tuned_target.recipe is None:
        return {"val_data": None, "val_note": "pass --data to measure val losses"}
    try:
        evalset = load_eval_set(tuned_target, tokenizer, data, fmt, n)
    except DataError as err:
        if data is not None:
            raise
        return {"val_data": None, "val_note": f"the run's val set cannot be used: {err}"}
    pad, device = tokenizer.pad_token_id, device_type()
    losses = {}
    for key, load in (
        ("val_loss_base", lambda: load_model(base_target, tokenizer, dtype="float32")),
        (
            "val_loss_extracted",
            lambda: attach_adapter(load_model(base_target, tokenizer, dtype="float32"), str(adapter_dir)),
        ),
        ("val_loss_tuned", lambda: load_model(tuned_target, tokenizer, dtype="float32")),
    ):
        model = load().eval()
        losses[key] = evaluate(model, evalset.examples, 8, pad, device, full_logits_sft())["loss"]
        del model
        gc.collect()
    return {"val_data": evalset.label, **losses}


def summary_lines(report: dict) -> str:
    """The human summary: a table of each layer's rank and retained energy (and of the tensors not
    captured), then the val losses and the wall time."""
    layers = _table(("module", "r", "retained energy"))
    for layer in report["layers"]:
        layers.add_row(Text(layer["module"]), str(layer["r"]), f"{layer['retained_energy']:.4f}")
    lines = [f"extracted {len(report['layers'])} linear layers → {report['out']} (adapter r {report['adapter_r']})"]
    lines.append(_render(layers))
    if report.get("not_captured"):
        others = _table(("not captured (--keep-other saves it)", "changed"))
        for other in report["not_captured"]:
            others.add_row(Text(other["tensor"]), f"{other['relative_change']:.2%}")
        lines.append(_render(others))
    if report.get("val_data"):
        lines.append(
            f"val loss on {report['val_data']}: base {report['val_loss_base']:.4f} · base + extracted "
            f"{report['val_loss_extracted']:.4f} · full fine-tune {report['val_loss_tuned']:.4f}"
        )
    return "\n".join(lines) + f"\n{report['wall_s']:.1f}s\n"


def print_summary(report: dict) -> None:
    messages().write(summary_lines(report))


def _table(columns: tuple[str, ...]) -> Table:
    """A plain table: no box, no colour; figures right-aligned. Cells are Text: a name's brackets are not markup."""
    table = Table(*columns, box=None, pad_edge=False, header_style=None)
    for column in table.columns[1:]:
        column.justify = "right"
    return table


def _render(table: Table) -> str:
    """`table` as plain text indented under its heading, one line per row however wide (a log is read by
    people and grep alike)."""
    buffer = io.StringIO()
    Console(file=buffer, width=10_000, color_system=None, force_terminal=False, highlight=False).print(table)
    return "\n".join("  " + line.rstrip() for line in buffer.getvalue().splitlines())
