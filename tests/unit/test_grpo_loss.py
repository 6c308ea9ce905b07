"""Loss parity: on the same log-probs and advantages, ftkit's grpo / dr_grpo / dapo equal TRL 1.16's own code.

TRL (a dev extra) is called directly, not transcribed: `GRPOTrainer._compute_loss`, unbound, on a stand-in
trainer whose `_get_per_token_logps_and_entropies` returns the per-token log-probs we chose (a leaf tensor, so
the gradients can be compared too), with given old-policy log-probs (ratios away from 1, so both clip sides
are exercised) and, with beta > 0, given reference log-probs. One micro-batch, one process, no accumulation
on TRL's side; ftkit's value is loss_sum / units, what the loop computes for a one-micro-batch step.
1e-6 is float32 rounding of a handful of operations on O(1) values.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from ftkit.tasks.grpo import loss as grpo_loss

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL is a dev extra: pip install -e '.[dev]'")

ROWS, WIDTH, MAX_NEW = 8, 10, 12
TOL = 1e-6


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(ROWS, WIDTH)
    for row in range(ROWS):
        mask[row, : int(torch.randint(1, WIDTH + 1, (1,), generator=g))] = 1  # completions of 1..WIDTH tokens
    logps = -torch.rand(ROWS, WIDTH, generator=g) * 3
    return {
        "logps": logps,
        "old": logps + 0.4 * torch.randn(ROWS, WIDTH, generator=g),  # ratios e^±0.4: many outside 1 ± 0.2
        "ref": logps + 0.3 * torch.randn(ROWS, WIDTH, generator=g),
        "advantages": torch.randn(ROWS, generator=g),
        "mask": mask,
    }


def trl_loss(data: dict, loss_type: str, beta: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TRL's loss, its gradient w.r.t. the policy log-probs)."""
    logps = data["logps"].clone().requires_grad_(True)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=eps_high,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_NEW,
        accelerator=SimpleNamespace(
            num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t, gather_for_metrics=lambda t: t
        ),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    stub.args.steps_per_generation = 1
    batch = {
        "prompt_ids": torch.zeros(ROWS, 2, dtype=torch.long),
        "prompt_mask": torch.ones(ROWS, 2, dtype=torch.long),
        "completion_ids": torch.zeros(ROWS, WIDTH, dtype=torch.long),
        "completion_mask": data["mask"].long(),
        "advantages": data["advantages"],
        "old_per_token_logps": data["old"],
        "num_items_in_batch": data["mask"].sum(),
    }
    if beta:
        batch["ref_per_token_logps"] = data["ref"]
    loss = trl_grpo.GRPOTrainer._compute_loss(stub, None, batch)
    loss.backward()
    return loss.detach(), logps.grad


def ftkit_loss(
    data: dict, loss_type: str, beta: float, eps_high: float, split: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ftkit's loss as the loop computes it with the rows cut into `split` micro-batches, its gradient)."""
    logps = data["logps"].clone().requires_grad_(True)
    parts = torch.arange(ROWS).chunk(split)
    total_units = sum(grpo_loss.units(data["mask"][p], loss_type, MAX_NEW) for p in parts)
    loss = torch.zeros(())
    for p in parts:
        per_token, _, _ = grpo_loss.per_token_loss(
            logps[p], data["old"][p], data["advantages"][p], 0.2, eps_high, beta, data["ref"][p]
        )
        loss = loss + grpo_loss.normalised_sum(per_token, data["mask"][p], loss_type) / total_units
    loss.backward()
    return loss.detach(), logps.grad


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_high", [0.2, 0.28])
def test_loss_and_gradient_equal_trl(loss_type, beta, eps_high):
    data = inputs()
    want, want_grad = trl_loss(data, loss_type, beta, eps_high)
    got, got_grad = ftkit_loss(data, loss_type, beta, eps_high)
    assert abs(float(got - want)) <= TOL, (loss_type, float(got), float(want))
    assert float((got_grad - want_grad).abs().max()) <= TOL
    assert float(want_grad.abs().max()) > 1e-3  # the gradient is not trivially zero (the clip does not cut all)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_accumulation_is_exact(loss_type):
    """Cut into micro-batches of unequal token counts, the step's loss and gradient stay those of one batch."""
    data = inputs(seed=1)
    whole, whole_grad = ftkit_loss(data, loss_type, 0.04, 0.2, split=1)
    cut, cut_grad = ftkit_loss(data, loss_type, 0.04, 0.2, split=4)
    assert abs(float(whole - cut)) <= TOL
    assert float((whole_grad - cut_grad).abs().max()) <= TOL


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    scaled = grpo_loss.group_advantages(rewards, 4, scale=True)
    centred = grpo_loss.group_advantages(rewards, 4, scale=False)
    assert torch.allclose(centred, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as TRL's nanstd
    assert torch.allclose(scaled[:4], centred[:4] / (std + 1e-4))
    assert torch.equal(scaled[4:], torch.zeros(4))  # a group whose rewards are all equal teaches nothing
