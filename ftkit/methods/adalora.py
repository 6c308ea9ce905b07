"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget moves to the layers that need it.

    ΔW = (alpha / r_k) · P Λ Q,   P ∈ R^{out×r}, Λ = diag(λ) ∈ R^{r×r}, Q ∈ R^{r×in}  (per layer k)

Every step, after the optimizer update and while the step's gradients are still there,
peft's `update_and_allocate(step)` scores each singular triplet by a smoothed sensitivity
|θ · ∂L/∂θ| (EMAs with beta1, beta2), and zeroes the least important λᵢ until the total
budget follows a cubic schedule from init_r to target_r per layer between steps tinit and
total − tfinal. The loop calls it through the generic `before_zero_grad` hook point.

The orthogonality penalty keeps P and Q near-orthogonal, as the SVD form assumes:

    R = orth_reg_weight · (1/n) Σ_k ( ‖Qₖ Qₖᵀ − I‖_F + ‖Pₖᵀ Pₖ − I‖_F )     (n = number of P and Q matrices)

peft adds R only inside `forward` when labels are passed, which ftkit's objectives never
do (they compute token-summed losses themselves), so it is returned here as the run's
`regularizer` and added once per optimizer step (training only, reported as reg_loss).
The final rank pattern is saved in adapter_config.json; loading resizes each layer to it.

Exact resume: the allocator's sensitivity EMAs (ipt, exp_avg_ipt, exp_avg_unc per adapter
tensor) and the current rank pattern live outside the weights and the optimizer, so they are
the method's checkpoint state (`MethodHooks.state`), restored before the first resumed step.
peft cuts the saved P, Λ, Q to the rank pattern whenever its config holds one, which a
checkpoint cannot take (the optimizer state, and the zeroed triplets the orthogonality
penalty still moves, are full-rank). So ftkit holds the pattern between steps: it is in
peft's config only while `update_and_allocate` runs and while `final/` is written (which is
cut to the pattern, as peft means the adapter to be shipped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peft
import torch

from ftkit.errors import ModelError
from ftkit.methods.adapters import check_target_modules, target_problems, task_type, wrap
from ftkit.methods.base import MethodHooks, RunInfo
from ftkit.recipe.methods import AdaloraConfig


def run_problems(config: AdaloraConfig, skeleton: Any, run: RunInfo) -> list[str]:
    """Targets that are not linear layers; a budget schedule that leaves no step to reallocate in."""
    return target_problems(skeleton, config) + _schedule_problems(config, run.total_steps)


def _schedule_problems(config: AdaloraConfig, total: int | None) -> list[str]:
    if total is None:
        return ["method.name: adalora needs the run's total steps for its budget schedule"]
    if config.tinit + config.tfinal >= total:
        return [
            f"method.tinit: tinit {config.tinit} + tfinal {config.tfinal} leave no steps of the run's {total} "
            "to reallocate the rank budget; lower them, or raise train.max_steps / train.epochs"
        ]
    return []


def apply(model: Any, config: AdaloraConfig, run: RunInfo) -> Any:
    total = run.total_steps
    for problem in _schedule_problems(config, total):
        raise ModelError(problem)
    check_target_modules(model, config.target_modules)
    peft_config = peft.AdaLoraConfig(
        init_r=config.init_r,
        target_r=config.target_r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        tinit=config.tinit,
        tfinal=config.tfinal,
        deltaT=config.delta_t,
        beta1=config.beta1,
        beta2=config.beta2,
        orth_reg_weight=config.orth_reg_weight,
        total_step=total,
        target_modules=config.target_modules,
        modules_to_save=config.modules_to_save,
        task_type=task_type(model),
    )
    return wrap(model, peft_config, config.name)


def hooks(model: Any, config: AdaloraConfig, run: RunInfo) -> MethodHooks:
    tuner = model.base_model  # peft's AdaLoraModel
    allocation = Allocation(tuner)
    return MethodHooks(
        before_zero_grad=[allocation.reallocate],
        regularizer=(lambda: orthogonality_penalty(model, config.orth_reg_weight)) if config.orth_reg_weight else None,
        save_final=allocation.save_final,
        state=allocation.state,
        load_state=allocation.load_state,
    )


class Allocation:
    """The rank pattern and sensitivity scores of one AdaLoRA run, held by ftkit between steps."""

    def __init__(self, tuner: Any):
        self.tuner = tuner
        self.config = tuner.peft_config[tuner.trainable_adapter_name]
        self.pattern: dict[str, list[bool]] | None = self.config.rank_pattern
        self.config.rank_pattern = None

    @contextlib.contextmanager
    def _pattern_in_config(self) -> Iterator[None]:
        self.config.rank_pattern = self.pattern
        try:
            yield
        finally:
            self.pattern, self.config.rank_pattern = self.config.rank_pattern, None

    def reallocate(self, step: int) -> None:
        """peft's update: scores, budget, and masking to the pattern (`step` 1-based, as peft counts)."""
        with self._pattern_in_config():
            self.tuner.update_and_allocate(step)

    def save_final(self, model: Any, out_dir: Path) -> None:
        with self._pattern_in_config():
            model.save_pretrained(out_dir, safe_serialization=True)

    def state(self) -> dict[str, Any]:
        """`{"<score>/<param name>": tensor, "rank_pattern/<lora_E name>": bool mask}`."""
        allocator = self.tuner.rankallocator
        tensors = {f"{kind}/{name}": value for kind in _SCORES for name, value in getattr(allocator, kind).items()}
        pattern = self.pattern or {}
        return tensors | {
            f"rank_pattern/{name}": torch.tensor(mask, dtype=torch.bool) for name, mask in pattern.items()
        }

    def load_state(self, tensors: dict[str, Any]) -> None:
        """Put back what `state` returned (scores on the device the adapter lives on)."""
        allocator = self.tuner.rankallocator
        allocator.reset_ipt()
        device = next(p.device for n, p in self.tuner.model.named_parameters() if "lora_" in n)
        pattern: dict[str, list[bool]] = {}
        for key, value in tensors.items():
            kind, name = key.split("/", 1)
            if kind == "rank_pattern":
                pattern[name] = value.tolist()
            else:
                getattr(allocator, kind)[name] = value.to(device)
        self.pattern = pattern or None


#: the RankAllocator's per-tensor dicts that carry across steps
_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def orthogonality_penalty(model: Any, weight: float) -> Any:
    """weight · mean over P and Q matrices of ‖QQᵀ − I‖_F or ‖PᵀP − I‖_F (peft's AdaLoraModel.forward term)."""
    terms = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_A" in name:  # Q ∈ R^{r×in}: rows orthonormal
            gram = param @ param.T
        elif "lora_B" in name:  # P ∈ R^{out×r}: columns orthonormal
            gram = param.T @ param
        else:
            continue
        terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)))
    if not terms:
        return torch.zeros(())
    return weight * torch.stack(terms).mean()
