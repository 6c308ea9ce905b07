"""The plain-language diagnosis of a run: a verdict on its train and val loss curves, with advice.

Trends compare *means of thirds* of the curve, so single noisy micro-batches cannot flip a verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Fewer logged train points than this and thirds hold one point each: any "trend" is noise.
MIN_TRAIN_POINTS = 6
# Relative change of mean train loss (middle third → last third) inside ±2% counts as flat:
# at that rate another run of the same length buys under 2%, not worth the compute.
FLAT_REL_CHANGE = 0.02
# Train loss rising more than 10% from the middle to the last third is divergence on its own;
# smaller rises are within the noise of a converged run unless val rises with it.
DIVERGE_REL_RISE = 0.10
# Validation loss more than 3% above its best is past the best point, not eval noise
# (val is a fixed set, so its noise is smaller than train's but not zero).
VAL_RISE_OVER_BEST = 0.03
# Fewer evals than this give no trend; the verdict then rests on the train curve alone.
MIN_VAL_POINTS = 2

STILL_LEARNING = "still learning"
OVERFITTING = "overfitting"
SUSPECT_SPLIT = "suspect data split"
PLATEAU = "plateau"
DIVERGING = "diverging"
TOO_SHORT = "too short to tell"


@dataclass(frozen=True)
class Diagnosis:
    """What the loss curves say: a verdict, one sentence of advice, and the figures behind it."""

    verdict: str
    advice: str
    figures: dict[str, Any] = field(default_factory=dict)


def diagnose(train: list[tuple[int, float]], val: list[tuple[int, float]]) -> Diagnosis:
    """Classify a run from its (step, loss) train and val curves.

    Trends: `train_change` = (mean of last third − mean of middle third) / mean of middle third;
    within ±FLAT_REL_CHANGE it is flat. Val falls when its last point is below the first eval
    of its last third by more than FLAT_REL_CHANGE and is within VAL_RISE_OVER_BEST of its best;
    it rises when its last point is more than VAL_RISE_OVER_BEST above its best.

        any non-finite loss                                                  → diverging
        fewer than MIN_TRAIN_POINTS train points                             → too short to tell
        train rising > DIVERGE_REL_RISE, or ending above its first third     → diverging
        train rising and val rising                                          → diverging
        train falling, val falling (or no val)                               → still learning
        val rising (train falling or flat)                                   → overfitting
        train falling, val flat and past its best                            → overfitting
        train flat, val falling                                              → suspect data split
        train flat, val flat (or no val)                                     → plateau
    A small train rise (≤ DIVERGE_REL_RISE) without val rising counts as flat.
    """
    figures: dict[str, Any] = {"n_train_points": len(train), "n_val_points": len(val)}
    bad = [(s, v) for s, v in [*train, *val] if not math.isfinite(v)]
    if bad:
        figures["first_non_finite_step"] = min(s for s, _ in bad)
        return Diagnosis(
            DIVERGING,
            f"Loss became non-finite at step {figures['first_non_finite_step']}: lower the learning rate "
            "(e.g. ÷10), keep gradient clipping on, and check the data for empty or broken rows.",
            figures,
        )
    if len(train) < MIN_TRAIN_POINTS:
        return Diagnosis(
            TOO_SHORT,
            f"Only {len(train)} logged train steps (need {MIN_TRAIN_POINTS}): train longer or log more often.",
            figures,
        )

    losses = [v for _, v in train]
    third = len(losses) // 3
    start, middle, last = _mean(losses[:third]), _mean(losses[third : 2 * third]), _mean(losses[-third:])
    train_change = _rel(last, middle)
    figures.update(train_start=start, train_middle=middle, train_end=last, train_change=train_change)
    train_trend = _trend(train_change)

    val_trend = _val_trend(val, figures)
    is_rising_alone = train_change > DIVERGE_REL_RISE or last > start
    if is_rising_alone or (train_trend == "rising" and val_trend == "rising"):
        return Diagnosis(
            DIVERGING,
            f"Train loss changed by {train_change:+.1%} over the last third: lower the learning rate "
            "(e.g. ÷3 to ÷10) and check the data for broken rows.",
            figures,
        )
    if train_trend == "rising":
        train_trend = "flat"  # a small rise with val not rising is noise around a plateau

    best_step = figures.get("best_step")
    # val flat but still at its best on the last eval means slow improvement, not overfitting yet
    is_val_at_best = bool(val) and best_step == val[-1][0]
    if val_trend == "rising" or (train_trend == "falling" and val_trend == "flat" and not is_val_at_best):
        return Diagnosis(
            OVERFITTING,
            f"Validation loss was best at step {best_step} and is {figures['val_change_since_best']:+.1%} "
            "above it now: stop near that step (fewer epochs), add training data, or regularise "
            "(dropout, weight decay).",
            figures,
        )
    if train_trend == "falling":
        if val_trend is None:
            watch = "add a validation set" if not val else "evaluate more often"
            return Diagnosis(
                STILL_LEARNING, f"Train loss is still falling: train longer, and {watch} to see when to stop.", figures
            )
        return Diagnosis(STILL_LEARNING, "Both losses are still falling: train longer (more epochs or steps).", figures)
    if val_trend == "falling":
        return Diagnosis(
            SUSPECT_SPLIT,
            "Validation loss falls while train loss is flat: check that val does not overlap train "
            "and that both come from the same distribution.",
            figures,
        )
    return Diagnosis(
        PLATEAU,
        "The loss has stopped moving: lower the learning rate (e.g. ÷3) or change the batch size; "
        "more steps at this setting will not help.",
        figures,
    )


def _val_trend(val: list[tuple[int, float]], figures: dict[str, Any]) -> str | None:
    """Val trend: "falling" | "flat" | "rising", or None when there are too few evals; records its figures."""
    if not val:
        return None
    best_step, best = min(val, key=lambda p: p[1])
    figures.update(best_step=best_step, val_best=best, val_end=val[-1][1])
    figures["val_change_since_best"] = _rel(val[-1][1], best)
    if len(val) < MIN_VAL_POINTS:
        return None
    # Last third of the evals, at least the final pair, so a two-eval run still has a trend.
    anchor = val[-max(2, len(val) // 3)][1]
    figures["val_change"] = _rel(val[-1][1], anchor)
    if figures["val_change_since_best"] > VAL_RISE_OVER_BEST:
        return "rising"
    return "falling" if figures["val_change"] < -FLAT_REL_CHANGE else "flat"


def _trend(rel_change: float) -> str:
    if rel_change < -FLAT_REL_CHANGE:
        return "falling"
    return "rising" if rel_change > FLAT_REL_CHANGE else "flat"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _rel(new: float, old: float) -> float:
    """Relative change (new − old) / |old|; 0 when old is 0 (nothing to scale by)."""
    return (new - old) / abs(old) if old else 0.0
