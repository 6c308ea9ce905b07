"""The preference objective: a batch of pairs → (summed loss, summed metrics), for the loop's seam.

A micro-batch of B pairs is one forward pass over 2B sequences, chosen then rejected, right-
padded to the longest (TRL's "concatenated forward"). Each sequence's answer log-probability is

    log π(y | x) = Σ_{t: label_t ≠ −100} log softmax(logits_{t−1})[y_t]

and the loss of the pair comes from `losses.LOSSES[objective.name]`. One pair is one unit:
the loop divides the window's summed loss by its number of pairs, so `batch_size 4 ×
grad_accum 1` and `batch_size 1 × grad_accum 4` give the same update.

Logged per step and per eval (means over pairs):
    rewards/chosen, rewards/rejected   the implicit rewards (see losses.py)
    rewards/accuracy                   share of pairs with chosen reward > rejected reward
    rewards/margin                     mean of chosen − rejected reward
    logps/chosen, logps/rejected       summed answer log-probs under the policy
    logps/accuracy                     share of pairs where the policy itself gives the chosen answer the
                                       higher log-prob (reference-free: meaningful before training too)
    nll/chosen                         with objective.sft_weight: the chosen answers' mean token NLL
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ftkit.data import PreferencePair, collate
from ftkit.recipe.schema import ObjectiveSection
from ftkit.tasks.preference.losses import LOSSES, PairLogps


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of the trained tokens, number of trained tokens) per sequence of `batch`.

    Works in float32 whatever the model's dtype. Logits are cut to the last `seq_len` positions,
    so prompt-learning adapters that prepend virtual tokens line up with the labels.
    """
    input_ids = batch["input_ids"]
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -input_ids.size(1) :][:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # log_softmax(x)[y] = x[y] − logsumexp(x): avoids materialising a second vocab-sized tensor
    token_logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return token_logps.sum(-1), mask.sum(-1)


def nll_of_chosen(pair: PairLogps) -> torch.Tensor:
    """−π_c / n_c per pair: the chosen answer's mean token NLL, the term `objective.sft_weight` adds
    (RPO, Pang et al. 2024, "Iterative Reasoning Preference Optimization": L = L_DPO + α · L_NLL,
    L_NLL length-normalised). TRL's rpo_alpha averages over all chosen tokens of the batch instead
    of per pair; with equal-length answers the two agree."""
    return -pair.chosen / pair.chosen_tokens.clamp(min=1)


class PreferenceObjective:
    """DPO, IPO, ORPO or SimPO as the loop's objective (collate / units / loss_sum).

    `reference` provides ρ for dpo/ipo (ftkit.tasks.preference.reference); None for orpo/simpo.
    """

    reports_perplexity = False  # exp(preference loss) means nothing

    def __init__(self, cfg: ObjectiveSection, reference: Any = None):
        if cfg.needs_reference and reference is None:
            raise ValueError(f"objective {cfg.name} needs a reference")
        self.cfg = cfg
        self.name = cfg.name
        self.reference = reference
        self.loss_fn = LOSSES[cfg.name]

    def collate(self, pairs: Sequence[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask / labels of the 2B sequences [chosen..., rejected...], and
        `ref_logps` (2B,) when the pairs carry precomputed reference log-probs."""
        batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
        if all(p.ref_logps is not None for p in pairs):
            batch["ref_logps"] = torch.tensor(
                [p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs], dtype=torch.float32
            )
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs in the batch."""
        return batch["input_ids"].size(0) // 2

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        n = self.units(batch)
        logps, tokens = sequence_logps(model, batch)
        pair = PairLogps(chosen=logps[:n], rejected=logps[n:], chosen_tokens=tokens[:n], rejected_tokens=tokens[n:])
        if self.cfg.needs_reference:
            ref = self.reference.logps(batch)
            pair.ref_chosen, pair.ref_rejected = ref[:n], ref[n:]
        loss, chosen_reward, rejected_reward = self.loss_fn(
            pair, beta=self.cfg.beta, label_smoothing=self.cfg.label_smoothing, gamma=self.cfg.gamma
        )
        extra = {}
        if self.cfg.sft_weight:
            nll = nll_of_chosen(pair)
            loss = loss + self.cfg.sft_weight * nll
            extra["nll/chosen"] = nll.detach().sum()
        chosen, rejected = pair.chosen.detach(), pair.rejected.detach()
        metrics = {
            "rewards/chosen": chosen_reward.sum(),
            "rewards/rejected": rejected_reward.sum(),
            "rewards/accuracy": (chosen_reward > rejected_reward).sum(),
            "rewards/margin": (chosen_reward - rejected_reward).sum(),
            "logps/chosen": chosen.sum(),
            "logps/rejected": rejected.sum(),
            "logps/accuracy": (chosen > rejected).sum(),
        } | extra
        return loss.sum(), {key: float(value) for key, value in metrics.items()}
