"""Preference losses: per-pair formulas on answer log-probabilities. Pure tensor maths, no model.

Notation for pair i: π_c, π_r = log π_θ(y_c | x), log π_θ(y_r | x), the policy's log-probability
of the chosen and rejected answer (summed over the answer's tokens); ρ_c, ρ_r the same under
the reference model; n_c, n_r the answers' token counts; σ the logistic function.

Each loss returns (loss, chosen_reward, rejected_reward), one value per pair. Rewards are the
implicit rewards each method optimises; a pair is "won" when chosen_reward > rejected_reward
(a tie, as at step 0 of DPO where policy = reference, counts as lost, as in TRL).

The formulas and defaults follow TRL 1.16 (trl/trainer/dpo_trainer.py `_compute_loss`,
trl/experimental/orpo/orpo_trainer.py `odds_ratio_loss`, trl/experimental/cpo/cpo_trainer.py
`cpo_loss`); tests/unit/test_preference_losses.py checks them against TRL to 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# log π(y|x) = 0 exactly (probability 1 in float32) makes ORPO's odds infinite and its gradient
# NaN; a mean token log-prob of -1e-6 (probability 0.999999) is as close to certain as matters.
MAX_MEAN_LOGP = -1e-6


@dataclass
class PairLogps:
    """Log-probabilities of a batch of pairs, each a (pairs,) tensor; ref_* are None without a reference."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


Losses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def dpo(p: PairLogps, beta: float, label_smoothing: float = 0.0, gamma: float | None = None) -> Losses:
    """DPO (Rafailov et al. 2023, eq. 7), conservative with label smoothing ε (Mitchell 2023):

        h = (π_c − ρ_c) − (π_r − ρ_r)
        loss = −(1 − ε) log σ(β h) − ε log σ(−β h)
        reward = β (π − ρ)

    ε is the assumed probability that a pair's labels are flipped; ε = 0 is plain DPO.
    """
    chosen_ratio, rejected_ratio = p.chosen - p.ref_chosen, p.rejected - p.ref_rejected
    h = chosen_ratio - rejected_ratio
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo(p: PairLogps, beta: float, label_smoothing: float = 0.0, gamma: float | None = None) -> Losses:
    """IPO (Azar et al. 2023, eq. 17), with log-ratios averaged over answer tokens as in TRL
    (confirmed with the IPO authors, per TRL's comment; makes β independent of answer length):

        h = (π_c − ρ_c) / n_c − (π_r − ρ_r) / n_r
        loss = (h − 1 / (2β))²
        reward = β (π − ρ)

    IPO regresses the margin to 1/(2β) instead of pushing it to infinity, so it does not
    overfit deterministic preferences the way DPO can.
    """
    chosen_ratio, rejected_ratio = p.chosen - p.ref_chosen, p.rejected - p.ref_rejected
    h = chosen_ratio / p.chosen_tokens.clamp(min=1) - rejected_ratio / p.rejected_tokens.clamp(min=1)
    loss = (h - 1 / (2 * beta)) ** 2
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo(p: PairLogps, beta: float, label_smoothing: float = 0.0, gamma: float | None = None) -> Losses:
    """ORPO (Hong et al. 2024, eqs. 6–7), reference-free, on mean token log-probs a = π / n:

        log odds(y) = a − log(1 − e^a)
        loss = −a_c + β · (−log σ(log odds(y_c) − log odds(y_r)))
        reward = β a

    The first term is the SFT loss on the chosen answer (mean token NLL, as in the paper);
    β is the paper's λ. TRL computes that NLL as a token mean over the whole batch, prompt
    included; here it is per pair on the answer, so gradient accumulation stays exact.
    """
    a_c = (p.chosen / p.chosen_tokens.clamp(min=1)).float().clamp(max=MAX_MEAN_LOGP)
    a_r = (p.rejected / p.rejected_tokens.clamp(min=1)).float().clamp(max=MAX_MEAN_LOGP)
    log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
    loss = -a_c - beta * F.logsigmoid(log_odds)
    return loss, beta * a_c.detach(), beta * a_r.detach()


def simpo(p: PairLogps, beta: float, label_smoothing: float = 0.0, gamma: float | None = None) -> Losses:
    """SimPO (Meng et al. 2024, eq. 6), reference-free, on mean token log-probs a = π / n,
    with TRL's label smoothing ε (CPO trainer, loss_type="simpo"):

        h = a_c − a_r − γ / β
        loss = −(1 − ε) log σ(β h) − ε log σ(−β h)
        reward = β a

    γ is the target reward margin: the loss keeps pushing until β(a_c − a_r) exceeds γ.
    """
    a_c = p.chosen / p.chosen_tokens.clamp(min=1)
    a_r = p.rejected / p.rejected_tokens.clamp(min=1)
    h = a_c - a_r - (gamma or 0.0) / beta
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss, beta * a_c.detach(), beta * a_r.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, stable on both sides of −ln 2 (Mächler 2012; as TRL's log1mexp)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


LOSSES: dict[str, Callable[..., Losses]] = {"dpo": dpo, "ipo": ipo, "orpo": orpo, "simpo": simpo}
