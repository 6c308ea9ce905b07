"""Optimizers and the learning-rate schedule.

The LR is a pure function of the optimizer step (`lr_at`), set on the param groups
before every step; there is no scheduler object whose state could drift on resume.
"""

from __future__ import annotations

import math
from typing import Any

import bitsandbytes as bnb
import torch

from ftkit.recipe.schema import TrainSection


def warmup_steps(train: TrainSection, total_steps: int) -> int:
    if train.warmup_steps is not None:
        return train.warmup_steps
    return int(math.ceil(train.warmup_ratio * total_steps))


def lr_at(step: int, train: TrainSection, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based) of `total_steps`.

    Linear warmup from lr/warmup to lr over `w` steps, then `constant`, `linear` or
    `cosine` decay from lr to lr·min_lr_ratio at the last step.
    """
    peak = float(train.lr)
    w = warmup_steps(train, total_steps)
    if step < w:
        return peak * (step + 1) / w
    if train.scheduler == "constant":
        return peak
    floor = peak * train.min_lr_ratio
    span = max(1, total_steps - w - 1)
    progress = min(1.0, (step - w) / span)
    if train.scheduler == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: list[Any], train: TrainSection) -> Any:
    """torch AdamW, or a bitsandbytes 8-bit / paged optimizer, over the trainable params; with
    `train.master_weights: kahan`, ftkit's Kahan-compensated AdamW (the recipe allows only adamw there)."""
    kwargs = dict(lr=float(train.lr), betas=tuple(train.betas), weight_decay=train.weight_decay)
    if train.master_weights == "kahan":
        return KahanAdamW(params, **kwargs)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[train.optimizer]
    return cls(params, **kwargs)


class KahanAdamW(torch.optim.Optimizer):
    """AdamW (torch's decoupled form, one tensor at a time) whose update of a 16-bit weight is Kahan-compensated.

    For each step t, with g the gradient (read in fp32), moments m, v in fp32:

        m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²
        θ ← θ (1 − lr·λ) − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)

    A 16-bit weight w is stored with a 16-bit compensation c such that θ ≈ w + c: the step is computed
    on θ = float(w) + float(c) in fp32, then w = round(θ) and c = round(θ − w). An update far below half
    an ulp of w accumulates in c until it moves w, instead of rounding away each step (Kahan summation;
    Zamirai et al. 2020, "Revisiting BFloat16 Training"). θ keeps ~16 significant bits, against fp32's
    24 and bf16's 8. fp32 weights are stepped directly (no compensation). Memory per 16-bit weight:
    2 B compensation + 8 B moments.

    A small wrapper rather than torchao / optimi: the update has to checkpoint and resume through
    ftkit's safetensors optimizer state like every other optimizer, and adding a dependency to the
    project for this one rule was not worth it (see issue 15's closing note).
    """

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                is_low = param.dtype in (torch.bfloat16, torch.float16)
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for key in self.MOMENTS:
                        state[key] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
                    if is_low:
                        state["compensation"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                grad = param.grad.float()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                theta = param.float() + state["compensation"].float() if is_low else param
                if decay:
                    theta.mul_(1 - lr * decay)
                theta.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**t))
                if is_low:
                    param.copy_(theta)
                    state["compensation"].copy_(theta - param.float())
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts a loaded state to its parameter's dtype; the moments of a 16-bit weight stay fp32."""
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        moments = {
            param: {key: saved[i][key] for key in self.MOMENTS if key in saved.get(i, {})}
            for param, i in zip(params, ids, strict=True)
        }
        super().load_state_dict(state_dict)
        for param, tensors in moments.items():
            for key, value in tensors.items():
                self.state[param][key] = value.to(device=param.device, dtype=torch.float32)
