"""The preference section of summary.json and report.md: figures, verdicts and the falling-chosen warning."""

from __future__ import annotations

import json

import pytest

from ftkit.report import write_report
from ftkit.tasks.preference.report import CHANCE, INVERTED, LEARNING, TOO_SHORT, summarize_preferences


def records(val_accuracy: list[float], val_chosen: list[float]) -> list[dict]:
    """Train lines at every step and an eval every 10 steps, with the given val curves."""
    out = []
    for i, (accuracy, chosen) in enumerate(zip(val_accuracy, val_chosen, strict=True)):
        step = 10 * (i + 1)
        train = {"rewards/accuracy": accuracy, "rewards/margin": accuracy - 0.5, "logps/chosen": chosen}
        out.append({"step": step, "loss": 0.7 - 0.1 * i, **train, "rewards/chosen": 0.1, "rewards/rejected": 0.0})
        out.append(
            {
                "step": step,
                "val_loss": 0.7 - 0.1 * i,
                "val_rewards/accuracy": accuracy,
                "val_rewards/margin": accuracy - 0.5,
                "val_logps/chosen": chosen,
                "val_logps/rejected": chosen - 1,
            }
        )
    return out


@pytest.mark.parametrize(
    "accuracy, chosen, verdict, warns",
    [
        ([0.6, 0.8, 0.9], [-20.0, -20.5, -20.4], LEARNING, False),
        ([0.5, 0.55, 0.5], [-20.0, -20.0, -20.1], CHANCE, False),
        ([0.4, 0.3, 0.2], [-20.0, -20.0, -20.0], INVERTED, False),
        ([0.6, 0.8, 0.9], [-20.0, -26.0, -35.0], LEARNING, True),  # the margin grows by pushing both down
        ([0.6], [-20.0], TOO_SHORT, False),
    ],
)
def test_diagnosis(accuracy, chosen, verdict, warns):
    summary = summarize_preferences(records(accuracy, chosen))
    assert summary["verdict"] == verdict
    assert bool(summary["warnings"]) == warns
    if warns:
        assert "chosen log-prob falling" in summary["warnings"][0] and "-35.00" in summary["warnings"][0]
    assert summary["figures"]["val/rewards/accuracy"] == {"first": accuracy[0], "last": accuracy[-1]}


def test_small_chosen_drift_is_not_flagged():
    """1 nat or 5 % of the chosen log-prob is the noise floor of a fixed val set."""
    summary = summarize_preferences(records([0.6, 0.8, 0.9], [-40.0, -41.0, -41.9]))
    assert summary["warnings"] == []


def test_sft_runs_get_no_preference_section(tmp_path):
    lines = [{"step": s, "loss": 2.0 / s} for s in range(1, 8)] + [{"step": 7, "val_loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = write_report(tmp_path, {"method": "lora"})
    assert "preference" not in summary
    assert "## Preferences" not in (tmp_path / "report.md").read_text()


def test_report_md_has_the_table_verdict_and_explanation(tmp_path):
    lines = records([0.6, 0.5, 0.5], [-20.0, -20.0, -20.0])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = write_report(tmp_path, {"method": "lora", "objective": "dpo"})
    report = (tmp_path / "report.md").read_text()
    assert summary["preference"]["verdict"] == CHANCE
    assert "## Preferences" in report and f"**{CHANCE}**" in report and "How to read these" in report
    assert "| rewards/accuracy | 0.60 | 0.50 | 0.60 | 0.50 |" in report
