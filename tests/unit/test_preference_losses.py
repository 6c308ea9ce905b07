"""Loss parity: on the same log-probs, ftkit's DPO / IPO / ORPO / SimPO equal TRL's own code to 1e-6.

TRL (a dev extra) is called directly, not transcribed:
- DPO and IPO: `DPOTrainer._compute_loss` (the loss is inline there), run on a stand-in
  trainer and a stand-in model that returns the per-token log-probs we chose, with precomputed
  reference log-probs; TRL's logged rewards/accuracies/margins are compared too;
- conservative DPO (label smoothing): TRL 1.16's DPO has no smoothed sigmoid any more, so
  `CPOTrainer.cpo_loss(loss_type="sigmoid")` — the same formula, −(1−ε)logσ(βh) − ε logσ(−βh) —
  is fed the log-ratios;
- ORPO: `ORPOTrainer.odds_ratio_loss`; SimPO: `CPOTrainer.cpo_loss(loss_type="simpo")`.
1e-6 is float32 rounding of a handful of operations on O(1) values.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from ftkit.tasks.preference.losses import LOSSES, PairLogps, dpo, ipo, orpo, simpo

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL is a dev extra: pip install -e '.[dev]'")
from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402

PAIRS, WIDTH = 6, 12
TOL = 1e-6


@pytest.fixture(scope="module")
def batch():
    """Per-token log-probs of 2 × PAIRS sequences (chosen first) with prompts and answers of varied length."""
    g = torch.Generator().manual_seed(0)
    completion = torch.zeros(2 * PAIRS, WIDTH, dtype=torch.long)
    for row in range(2 * PAIRS):
        start = int(torch.randint(2, 6, (1,), generator=g))
        end = int(torch.randint(start + 2, WIDTH + 1, (1,), generator=g))
        completion[row, start:end] = 1
    shift = completion[:, 1:]
    token_logps = -torch.rand(2 * PAIRS, WIDTH - 1, generator=g) * 3 * shift  # zero off the answer, as TRL's head
    ref = -torch.rand(2 * PAIRS, generator=g) * 3 - shift.sum(1)  # plausible reference sums
    return SimpleNamespace(completion=completion, token_logps=token_logps, ref=ref)


def pair_logps(batch, with_ref: bool = True) -> PairLogps:
    sums, tokens = batch.token_logps.sum(1), batch.completion[:, 1:].sum(1)
    return PairLogps(
        chosen=sums[:PAIRS],
        rejected=sums[PAIRS:],
        chosen_tokens=tokens[:PAIRS],
        rejected_tokens=tokens[PAIRS:],
        ref_chosen=batch.ref[:PAIRS] if with_ref else None,
        ref_rejected=batch.ref[PAIRS:] if with_ref else None,
    )


def trl_dpo_loss(batch, loss_type: str, beta: float) -> tuple[float, dict]:
    """TRL's DPOTrainer._compute_loss on a stand-in trainer whose model returns `batch.token_logps`."""
    n = batch.completion.shape[0]
    outputs = SimpleNamespace(
        log_probs=batch.token_logps,
        entropy=torch.zeros(n, WIDTH - 1),
        mean_logits=torch.zeros(n, WIDTH - 1),
        is_top1=torch.zeros(n, WIDTH - 1, dtype=torch.bool),
    )
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(n, WIDTH, dtype=torch.long),
        "attention_mask": torch.ones(n, WIDTH, dtype=torch.long),
        "completion_mask": batch.completion,
        "ref_chosen_logps": batch.ref[:PAIRS],
        "ref_rejected_logps": batch.ref[PAIRS:],
    }
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def cpo_stand_in(loss_type: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0):
    return SimpleNamespace(
        alpha=0.0,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        simpo_gamma=gamma,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )


@pytest.mark.parametrize("name, loss_type", [("dpo", "sigmoid"), ("ipo", "ipo")])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_and_ipo_equal_trl(batch, name, loss_type, beta):
    loss, chosen_reward, rejected_reward = LOSSES[name](pair_logps(batch), beta=beta)
    trl_loss, trl_metrics = trl_dpo_loss(batch, loss_type, beta)
    assert float(loss.mean()) == pytest.approx(trl_loss, abs=TOL)
    assert float(chosen_reward.mean()) == pytest.approx(trl_metrics["rewards/chosen"], abs=TOL)
    assert float(rejected_reward.mean()) == pytest.approx(trl_metrics["rewards/rejected"], abs=TOL)
    accuracy = float((chosen_reward > rejected_reward).float().mean())
    assert accuracy == pytest.approx(trl_metrics["rewards/accuracies"], abs=TOL)
    assert float((chosen_reward - rejected_reward).mean()) == pytest.approx(trl_metrics["rewards/margins"], abs=TOL)
    # a batch where the loss is far from its value at h = 0, so agreement is not trivial
    assert 0.0 < accuracy < 1.0


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_conservative_dpo_equals_trl_smoothed_sigmoid(batch, label_smoothing):
    p = pair_logps(batch)
    loss, _, _ = dpo(p, beta=0.2, label_smoothing=label_smoothing)
    trl_losses, _, _ = CPOTrainer.cpo_loss(
        cpo_stand_in("sigmoid", beta=0.2, label_smoothing=label_smoothing),
        p.chosen - p.ref_chosen,
        p.rejected - p.ref_rejected,
    )
    assert torch.allclose(loss, trl_losses, atol=TOL, rtol=0)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_equals_trl(batch, beta):
    p = pair_logps(batch, with_ref=False)
    loss, chosen_reward, rejected_reward = orpo(p, beta=beta)
    mean_c, mean_r = p.chosen / p.chosen_tokens, p.rejected / p.rejected_tokens
    trl_ratio, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(
        SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu"))), mean_c, mean_r
    )
    # TRL: loss = nll − mean(β log σ(log odds ratio)); with the same NLL (the chosen answer's mean token NLL)
    nll = (-mean_c).mean()
    assert float(loss.mean()) == pytest.approx(float(nll - trl_ratio.mean()), abs=TOL)
    assert torch.allclose(chosen_reward, trl_chosen, atol=TOL, rtol=0)
    assert torch.allclose(rejected_reward, trl_rejected, atol=TOL, rtol=0)


@pytest.mark.parametrize("beta, gamma, label_smoothing", [(2.0, 1.0, 0.0), (2.5, 0.5, 0.1)])
def test_simpo_equals_trl(batch, beta, gamma, label_smoothing):
    p = pair_logps(batch, with_ref=False)
    loss, chosen_reward, rejected_reward = simpo(p, beta=beta, label_smoothing=label_smoothing, gamma=gamma)
    mean_c, mean_r = p.chosen / p.chosen_tokens, p.rejected / p.rejected_tokens
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(
        cpo_stand_in("simpo", beta=beta, label_smoothing=label_smoothing, gamma=gamma), mean_c, mean_r
    )
    assert torch.allclose(loss, trl_losses, atol=TOL, rtol=0)
    assert torch.allclose(chosen_reward, trl_chosen, atol=TOL, rtol=0)
    assert torch.allclose(rejected_reward, trl_rejected, atol=TOL, rtol=0)


def test_known_values_by_hand():
    """Closed forms at simple points, independent of TRL."""
    one = torch.ones(1)
    tied = PairLogps(
        chosen=-one, rejected=-one, chosen_tokens=one, rejected_tokens=one, ref_chosen=-one, ref_rejected=-one
    )
    assert float(dpo(tied, beta=0.1)[0]) == pytest.approx(math.log(2), abs=TOL)  # h = 0: −log σ(0)
    assert float(ipo(tied, beta=0.1)[0]) == pytest.approx((1 / 0.2) ** 2, abs=1e-4)  # (0 − 1/(2β))²
    # SimPO at equal answers: −log σ(−γ)
    assert float(simpo(tied, beta=2.0, gamma=1.0)[0]) == pytest.approx(math.log(1 + math.e), abs=TOL)
    # ORPO at equal answers: NLL + β log 2
    assert float(orpo(tied, beta=0.1)[0]) == pytest.approx(1 + 0.1 * math.log(2), abs=TOL)


def test_orpo_is_finite_when_the_chosen_answer_is_certain():
    """log π = 0 (probability 1 in float32) would make the odds infinite; the loss and its gradient stay finite."""
    chosen = torch.zeros(1, requires_grad=True)
    p = PairLogps(
        chosen=chosen, rejected=-torch.ones(1) * 5, chosen_tokens=torch.ones(1), rejected_tokens=torch.ones(1)
    )
    loss, _, _ = orpo(p, beta=0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(chosen.grad).all()
