"""GRPO's loss on per-token log-probabilities: the clipped surrogate, the k3 KL, and the three normalisations.

For completion i (of a group of G sampled for one prompt) with advantage A_i and tokens t:

    r_{i,t}  = exp(log π(o_t) − log π_old(o_t))                   probability ratio
    L_{i,t}  = −min(r_{i,t} A_i, clip(r_{i,t}, 1 − ε, 1 + ε_high) A_i) + β · KL_{i,t}
    KL_{i,t} = exp(ρ_t − log π(o_t)) − (ρ_t − log π(o_t)) − 1     k3 estimator, ρ = log π_ref (Schulman 2020)

Normalisation over a step's completions (loss_type), as TRL 1.16 defines them:

    dapo     Σ_{i,t} L_{i,t} / Σ_i |o_i|                 one token weighs the same wherever it is (DAPO, Yu et al. 2025)
    grpo     Σ_i (Σ_t L_{i,t} / |o_i|) / N               each completion weighs the same: long ones' tokens weigh less
    dr_grpo  Σ_{i,t} L_{i,t} / (N · max_new_tokens)      a constant divisor: no length bias (Liu et al. 2025)

`loss_sum` returns the numerator and `units` the divisor's count for one micro-batch; the loop
adds both over the accumulation window and divides once, so every variant equals its whole-step
value however the step is cut into micro-batches (dapo: one completion token is the unit; grpo:
one completion; dr_grpo: one completion's max_new_tokens budget).
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def per_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(L_{i,t}, KL_{i,t} or None when beta is 0, r_{i,t}) for (N, T) log-probs and (N,) advantages."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    advantages = advantages.unsqueeze(1)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        loss = loss + beta * kl
    return loss, kl, ratio


def normalised_sum(loss: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The numerator of the step's loss contributed by these completions (see the module docstring)."""
    mask = mask.to(loss.dtype)
    if loss_type == "grpo":
        return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    if loss_type in ("dapo", "dr_grpo"):
        return (loss * mask).sum()
    raise ValueError(f"unknown loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")


def units(mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> int:
    """The divisor's count for these completions: tokens (dapo), completions (grpo), completions × budget (dr_grpo)."""
    if loss_type == "dapo":
        return int(mask.sum())
    if loss_type == "grpo":
        return int(mask.size(0))
    if loss_type == "dr_grpo":
        return int(mask.size(0)) * max_new_tokens
    raise ValueError(f"unknown loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """A_i = r_i − mean of its group, divided by the group's std (unbiased, + 1e-4) when `scale` (GRPO; Dr. GRPO
    drops the division). `rewards` (N,) holds the groups one after another, N = prompts × group_size."""
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(-1)
