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
"""

from __future__ import annotations

from typing import Any

from ftkit.errors import ModelError
from ftkit.methods.adapters import check_target_modules, task_type, wrap
from ftkit.methods.base import MethodHooks, RunInfo
from ftkit.methods.configs import AdaloraConfig


def apply(model: Any, config: AdaloraConfig, run: RunInfo) -> Any:
    import peft

    total = run.total_steps
    if total is None:
        raise ModelError("method.name: adalora needs the run's total steps for its budget schedule")
    if config.tinit + config.tfinal >= total:
        raise ModelError(
            f"method.tinit: tinit {config.tinit} + tfinal {config.tfinal} leave no steps of the run's {total} "
            "to reallocate the rank budget; lower them or train longer"
        )
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

    def reallocate(step: int) -> None:
        tuner.update_and_allocate(step)

    return MethodHooks(
        before_zero_grad=[reallocate],
        regularizer=(lambda: orthogonality_penalty(model, config.orth_reg_weight)) if config.orth_reg_weight else None,
    )


def orthogonality_penalty(model: Any, weight: float) -> Any:
    """weight · mean over P and Q matrices of ‖QQᵀ − I‖_F or ‖PᵀP − I‖_F (peft's AdaLoraModel.forward term)."""
    import torch

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
