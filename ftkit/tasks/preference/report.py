"""The preference section of a run's summary and report (DPO, IPO, ORPO, SimPO runs).

Reads the metrics the preference objective logs (ftkit.tasks.preference.objective): per step
rewards/chosen, rewards/rejected, rewards/accuracy, rewards/margin, logps/chosen, logps/rejected,
logps/accuracy, and the same prefixed `val_` per eval. Runs without them get no section.

Diagnosis, from the validation curve when there are at least two evals, else from train:

    last accuracy < CHANCE_LOW                        → preferring the rejected answers
    last accuracy within [CHANCE_LOW, CHANCE_HIGH]    → stuck near chance
    chosen log-prob fell by more than LOGP_FALL       → chosen log-prob falling (a warning; it
                                                        can come with any accuracy)
    otherwise                                         → learning the preference
"""

from __future__ import annotations

import math
from typing import Any

# Accuracy within 0.5 ± 0.1 after training: the model does not tell chosen from rejected. With
# tens of val pairs, ±0.1 is about two standard errors of a coin flip, so it is not bad luck.
CHANCE_LOW, CHANCE_HIGH = 0.4, 0.6
# Chosen log-prob (nats per answer) falling by more than 5% of its size, or 1 nat, whichever is
# larger: less is noise of a fixed val set; more means the model is unlearning the good answers.
LOGP_FALL_REL, LOGP_FALL_ABS = 0.05, 1.0
# Fewer logged points than this and "first" and "last" are the same few steps.
MIN_POINTS = 2

LEARNING = "learning the preference"
CHANCE = "stuck near chance"
INVERTED = "preferring the rejected answers"
CHOSEN_FALLING = "chosen log-prob falling"
TOO_SHORT = "too short to tell"

KEYS = (
    "rewards/accuracy",
    "rewards/margin",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "logps/accuracy",
)

EXPLANATION = """\
How to read these: each pair has a chosen and a rejected answer. The *reward* of an answer is
what the objective optimises — for dpo/ipo β·(log π(answer) − log π_ref(answer)), how much more
likely the model made it than the reference (the model before this run); for orpo/simpo β × the
mean token log-prob. *Reward accuracy* is the share of pairs whose chosen reward beats the
rejected one; it starts at 0 for dpo/ipo, because at step 0 the model is the reference and every
margin is exactly 0 (a tie counts as wrong). *Margin* is the mean chosen − rejected reward.
*Log-probs* are the model's own summed log-probabilities of the answers, and *log-prob accuracy*
the share of pairs where the model itself gives the chosen answer the higher one, with no
reference: it is meaningful before training too.
"""


def summarize_preferences(records: list[dict]) -> dict | None:
    """First/last figures of train and val preference metrics and a diagnosis; None for other runs."""
    train = [r for r in records if "rewards/accuracy" in r and "val_loss" not in r]
    val = [r for r in records if "val_rewards/accuracy" in r]
    if not train and not val:
        return None
    figures: dict[str, Any] = {}
    for split, rows, prefix in (("train", train, ""), ("val", val, "val_")):
        for key in KEYS:
            values = [float(r[prefix + key]) for r in rows if r.get(prefix + key) is not None]
            if values:
                figures[f"{split}/{key}"] = {"first": values[0], "last": values[-1]}
    verdict, advice, warnings = diagnose_preferences(train, val)
    return {"figures": figures, "verdict": verdict, "advice": advice, "warnings": warnings, "n_evals": len(val)}


def diagnose_preferences(train: list[dict], val: list[dict]) -> tuple[str, str, list[str]]:
    """(verdict, advice, warnings) from the val curve when there are ≥ MIN_POINTS evals, else train."""
    rows, prefix, where = (val, "val_", "validation") if len(val) >= MIN_POINTS else (train, "", "training")
    accuracy = [float(r[prefix + "rewards/accuracy"]) for r in rows]
    chosen = [float(r[prefix + "logps/chosen"]) for r in rows if r.get(prefix + "logps/chosen") is not None]
    if len(accuracy) < MIN_POINTS or not all(math.isfinite(a) for a in accuracy):
        return TOO_SHORT, f"Only {len(accuracy)} {where} points with preference metrics: train longer.", []
    warnings = []
    if len(chosen) >= MIN_POINTS:
        fall = chosen[0] - chosen[-1]
        if fall > max(LOGP_FALL_ABS, LOGP_FALL_REL * abs(chosen[0])):
            warnings.append(
                f"{CHOSEN_FALLING}: the chosen answers' log-prob fell from {chosen[0]:.2f} to {chosen[-1]:.2f} "
                f"({where}). The margin then grows because the rejected answers fall faster, a known DPO failure "
                "that degrades generation: set objective.sft_weight: 1 (an NLL term on the chosen answer, RPO), lower "
                "train.lr, raise objective.beta, train fewer steps, or use objective.name: ipo (bounded margin) or "
                "orpo (keeps an SFT term on the chosen answer)."
            )
    last = accuracy[-1]
    if last < CHANCE_LOW:
        return (
            INVERTED,
            f"Reward accuracy ends at {last:.2f} ({where}): the model learned to prefer the rejected answers. "
            "Check that chosen and rejected are not swapped in the data.",
            warnings,
        )
    if last <= CHANCE_HIGH:
        return (
            CHANCE,
            f"Reward accuracy ends at {last:.2f} ({where}), near a coin flip: the model does not tell chosen "
            "from rejected. Check that the pairs differ in something the prompt decides; fine-tune (SFT) first "
            "so the model can produce the chosen answers; raise train.lr or train longer.",
            warnings,
        )
    return (
        LEARNING,
        f"Reward accuracy went from {accuracy[0]:.2f} at step {rows[0].get('step', '?')} to {last:.2f} at step "
        f"{rows[-1].get('step', '?')} ({where}; for dpo/ipo it is 0 before the first step, when the model is "
        "its own reference and every margin a tie).",
        warnings,
    )


def preference_section(preference: dict) -> str:
    """The report.md section: a table of first/last figures, the diagnosis, and how to read them."""
    figures = preference.get("figures") or {}
    lines = ["## Preferences\n", "| | train first | train last | val first | val last |", "|---|---|---|---|---|"]
    for key in KEYS:
        cells = []
        for split in ("train", "val"):
            pair = figures.get(f"{split}/{key}") or {}
            cells += [_fmt(key, pair.get("first")), _fmt(key, pair.get("last"))]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", f"**{preference.get('verdict', 'n/a')}** — {preference.get('advice', '')}", ""]
    lines += [f"- ⚠ {warning}" for warning in preference.get("warnings") or []]
    lines += ["", EXPLANATION]
    return "\n".join(lines)


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if "accuracy" in key else f"{value:.4f}" if "rewards" in key else f"{value:.2f}"
