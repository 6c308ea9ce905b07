"""Where trained weights live when the model loads in 16 bits, and the autocast around them.

At the learning rates full fine-tuning uses (1e-5), an AdamW update is ~lr per weight, while half a
bf16 ulp of a weight of magnitude 0.02 is 6e-5: stepped in bf16, most updates round away and the
model barely learns (issue 15: a fifth of fp32's progress in 40 steps). So by default
(`train.master_weights: fp32`) every *trained* tensor is held in fp32 — it is its own master copy,
the optimizer's moments follow it in fp32 — and the forward and backward still run in the model's
16-bit dtype through autocast, which casts each weight to bf16 for its matmul. Frozen weights stay
in `model.dtype`. This is what HF Trainer with peft and torchtune's recommended settings do.

    master_weights  trained weight         extra                    AdamW B/param (w + grad + states)
    fp32            fp32 (the master)      bf16 copy for compute    4 (+2 copy) + 4 + 8 = 18
    kahan           bf16                   bf16 compensation        2 + 2 + 2 + 8 = 14
    none            bf16                   -                        2 + 2 + 4 = 8  (torch keeps states in bf16)

`kahan` (ftkit.train.optim.KahanAdamW) keeps weight + compensation ≈ the fp32 value, so small
updates accumulate instead of rounding away; `none` is plain 16-bit training.
"""

from __future__ import annotations

from typing import Any

import torch

from ftkit.errors import ModelError
from ftkit.models.load import resolve_dtype
from ftkit.recipe.schema import Recipe

AUTOCAST = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def device_type() -> str:
    """The device a one-process run trains on, before accelerate is built: cuda when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast_mode(recipe: Recipe, device: str) -> str:
    """accelerate's mixed-precision mode. `auto`: the model's dtype when it loads in 16 bits (so fp32
    master weights compute in it), else bf16 on a bf16-capable GPU, else none."""
    name = recipe.train.mixed_precision
    if name != "auto":
        return name
    load = resolve_dtype(recipe.model.dtype, device)
    if load in AUTOCAST:
        return AUTOCAST[load]
    return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"


def precision_problems(recipe: Recipe, device: str) -> list[str]:
    """What cannot run as asked: fp16 without a CUDA GPU (accelerate scales the loss only there), and
    fp32 master weights beside 16-bit frozen ones without autocast (their matmuls would mix dtypes)."""
    problems = []
    mode, load = autocast_mode(recipe, device), resolve_dtype(recipe.model.dtype, device)
    if mode == "fp16" and device != "cuda":
        key = "train.mixed_precision" if recipe.train.mixed_precision == "fp16" else "model.dtype"
        problems.append(
            f"{key}: fp16 trains with loss scaling, which accelerate runs on a CUDA GPU only; "
            "on this machine use model.dtype bfloat16 or float32"
        )
    if mode == "no" and load in AUTOCAST and recipe.train.master_weights == "fp32":
        problems.append(
            f"train.mixed_precision: no computes in the weights' own dtypes, but the model loads in {load} and "
            "train.master_weights: fp32 keeps the trained weights in float32; use mixed_precision: auto, "
            "or master_weights: none"
        )
    return problems


def check_precision(recipe: Recipe, device: str) -> None:
    problems = precision_problems(recipe, device)
    if problems:
        raise ModelError("\n".join(problems))


def place_trained_weights(model: Any, choice: str, load_dtype: Any) -> str:
    """Put every trained floating-point tensor in the dtype `choice` says (module docstring); returns
    what ran, in words, for the log and summary.json."""
    trained = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    if load_dtype not in AUTOCAST:
        return f"{_name(load_dtype)} weights (no master copy needed)"
    target = torch.float32 if choice == "fp32" else load_dtype
    for param in trained:
        if param.dtype != target:
            param.data = param.data.to(target)  # before the optimizer exists: its state follows this dtype
    low = _name(load_dtype)
    return {
        "fp32": f"fp32 master weights, {low} compute",
        "kahan": f"{low} weights with a Kahan-compensated update",
        "none": f"{low} weights, no master copy",
    }[choice]


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
