"""ftkit.report: metrics reading, the diagnosis table, and the three files of write_report."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from ftkit.errors import FtkitError
from ftkit.report import Diagnosis, diagnose, read_metrics, write_report
from ftkit.report.plot import smooth

STEPS = range(1, 301)
EVAL_STEPS = range(50, 301, 50)


def decaying(step: int, scale: float = 3.0, floor: float = 1.0, tau: float = 100.0) -> float:
    """A loss that falls fast, then ever slower: still >2% per third at step 300 with tau=100."""
    return floor + scale * math.exp(-step / tau)


def noisy(values: list[float], rel: float = 0.1, seed: int = 0) -> list[float]:
    """±rel multiplicative noise, as per-batch train losses have."""
    rng = random.Random(seed)
    return [v * (1 + rng.uniform(-rel, rel)) for v in values]


def pairs(steps, values) -> list[tuple[int, float]]:
    return list(zip(steps, values, strict=True))


def test_both_falling_is_still_learning_even_with_noisy_train():
    train = pairs(STEPS, noisy([decaying(s) for s in STEPS]))
    val = pairs(EVAL_STEPS, [decaying(s) + 0.1 for s in EVAL_STEPS])
    d = diagnose(train, val)
    assert d.verdict == "still learning", d
    assert "longer" in d.advice


def test_train_falling_val_rising_is_overfitting_and_names_best_step():
    train = pairs(STEPS, [decaying(s) for s in STEPS])
    # U-shaped val: best at step 150, 20% above it by the end.
    val = pairs(EVAL_STEPS, [2.0, 1.8, 1.6, 1.7, 1.8, 1.92])
    d = diagnose(train, val)
    assert d.verdict == "overfitting", d
    assert d.figures["best_step"] == 150
    assert "150" in d.advice
    assert d.figures["val_change_since_best"] == pytest.approx(0.2)


def test_train_falling_val_flat_is_overfitting():
    train = pairs(STEPS, [decaying(s) for s in STEPS])
    val = pairs(EVAL_STEPS, [2.0, 1.9, 1.85, 1.85, 1.85, 1.85])
    assert diagnose(train, val).verdict == "overfitting"


def test_train_flat_val_falling_is_suspect_split():
    train = pairs(STEPS, noisy([2.0] * len(STEPS), rel=0.05))
    val = pairs(EVAL_STEPS, [2.0, 1.8, 1.6, 1.4, 1.2, 1.0])
    assert diagnose(train, val).verdict == "suspect data split"


def test_both_flat_is_plateau():
    train = pairs(STEPS, noisy([2.0] * len(STEPS), rel=0.05))
    val = pairs(EVAL_STEPS, [2.1, 2.1, 2.1, 2.1, 2.1, 2.1])
    d = diagnose(train, val)
    assert d.verdict == "plateau"
    assert "learning rate" in d.advice


def test_both_rising_is_diverging():
    # Falls to 1.0 by step 100, then climbs back to 3.0: ends above where it started.
    train = pairs(STEPS, [3.0 - 2 * s / 100 if s <= 100 else 1.0 + 2 * (s - 100) / 200 for s in STEPS])
    val = pairs(EVAL_STEPS, [1.5, 1.2, 1.6, 2.0, 2.5, 3.0])
    d = diagnose(train, val)
    assert d.verdict == "diverging"
    assert "learning rate" in d.advice


def test_mild_train_rise_with_val_rising_is_diverging():
    # +5% train rise: under DIVERGE_REL_RISE alone, but val rising with it is divergence, not overfitting.
    train = pairs(STEPS, [2.0] * 100 + [2.0] * 100 + [2.1] * 100)
    val = pairs(EVAL_STEPS, [2.0, 2.0, 2.0, 2.1, 2.2, 2.3])
    assert diagnose(train, val).verdict == "diverging"


def test_non_finite_loss_is_diverging_and_names_step():
    values = [decaying(s) for s in STEPS]
    values[200] = float("nan")
    d = diagnose(pairs(STEPS, values), [])
    assert d.verdict == "diverging"
    assert d.figures["first_non_finite_step"] == 201


def test_infinite_val_loss_is_diverging():
    train = pairs(STEPS, [decaying(s) for s in STEPS])
    val = pairs(EVAL_STEPS, [2.0, 1.8, float("inf"), 1.7, 1.6, 1.5])
    assert diagnose(train, val).verdict == "diverging"


def test_few_points_is_too_short():
    d = diagnose([(1, 5.0), (2, 4.0), (3, 3.0)], [(3, 3.0)])
    assert d.verdict == "too short to tell"


def test_no_val_judges_on_train_alone():
    falling = diagnose(pairs(STEPS, [decaying(s) for s in STEPS]), [])
    flat = diagnose(pairs(STEPS, noisy([2.0] * len(STEPS), rel=0.05)), [])
    assert falling.verdict == "still learning"
    assert "validation" in falling.advice
    assert "best_step" not in falling.figures
    assert flat.verdict == "plateau"


def test_diagnosis_is_frozen():
    d = Diagnosis("plateau", "x", {})
    with pytest.raises(AttributeError):
        d.verdict = "overfitting"  # type: ignore[misc]


# ---------------------------------------------------------------- read_metrics


def test_read_metrics_skips_blank_and_torn_last_line(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": NaN}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]
    assert math.isnan(records[0]["loss"])


def test_read_metrics_bad_middle_line_names_path_and_line(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(FtkitError, match=rf"{path}:3:"):
        read_metrics(path)


# ---------------------------------------------------------------- write_report

FACTS = {
    "model": "builtin:tiny-llama",
    "method": "lora",
    "trainable_params": 1234,
    "total_params": 456789,
    "trainable_pct": 0.27,
    "train_examples": 900,
    "val_examples": 100,
    "truncated": {"train": 2, "val": 0},
    "steps": 300,
    "epochs": 3.0,
    "wall_s": 250.1,
    "tokens_per_s": 5000.0,
    "peak_mem_bytes": None,
    "device": "cpu",
    "status": "completed",
    "optimizer": "adamw",
    "lr": 1e-4,
    "batch_size": 8,
    "grad_accum": 2,
}


def make_run_dir(tmp_path: Path, samples: bool = True) -> Path:
    """A run directory as the trainer leaves it: overfitting curves, a NaN val, samples."""
    run = tmp_path / "run"
    run.mkdir()
    lines = []
    for s in STEPS:
        lines.append(
            {
                "step": s,
                "epoch": s / 100,
                "loss": decaying(s),
                "lr": 1e-4,
                "grad_norm": 1.0,
                "tokens": 100 * s,
                "tokens_per_s": 5000.0,
                "mem_bytes": None,
                "wall_s": s * 0.8,
            }
        )
        if s in EVAL_STEPS:
            val_loss = {50: 2.0, 100: 1.8, 150: 1.6, 200: 1.7, 250: 1.8, 300: 1.92}[s]
            lines.append({"step": s, "epoch": s / 100, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if samples:
        rows = [
            {"prompt": "Extract: Foo (2001)", "target": "inform(name[Foo])", "generated": "inform(name[Foo])\n"},
            {"prompt": "Extract: Bar (1999)", "target": "inform(name[Bar])", "generated": "inform(name[Baz])"},
        ]
        (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_write_report_writes_three_files_with_right_figures(tmp_path: Path):
    run = make_run_dir(tmp_path)
    summary = write_report(run, FACTS)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary
    assert summary["facts"] == FACTS
    assert summary["best_step"] == 150
    assert summary["best_val_loss"] == pytest.approx(1.6)
    assert summary["final_val_loss"] == pytest.approx(1.92)
    assert summary["first_loss"] == pytest.approx(decaying(1))
    assert summary["final_loss"] == pytest.approx(sum(decaying(s) for s in range(296, 301)) / 5)
    assert summary["n_logged_steps"] == 300
    assert summary["diagnosis"]["verdict"] == "overfitting"
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(".*.tmp")), "temp files must be replaced, not left behind"


def test_report_md_has_facts_verdict_and_samples(tmp_path: Path):
    run = make_run_dir(tmp_path)
    write_report(run, FACTS)
    md = (run / "report.md").read_text()
    assert "builtin:tiny-llama" in md
    assert "1,234 of 456,789 (0.27%)" in md
    assert "n/a on CPU" in md
    assert "batch_size 8 × grad_accum 2 = 16 per step" in md
    assert "![loss](loss.png)" in md
    assert "**overfitting**" in md
    assert "## Samples" in md
    assert "1 of 2 generations match" in md
    assert "✓ exact match" in md and "✗ differs" in md
    assert "```\ninform(name[Baz])\n```" in md


def test_report_md_has_no_samples_section_without_samples(tmp_path: Path):
    run = make_run_dir(tmp_path, samples=False)
    write_report(run, FACTS)
    assert "## Samples" not in (run / "report.md").read_text()


def test_write_report_without_facts_rereads_them_from_summary(tmp_path: Path):
    run = make_run_dir(tmp_path)
    write_report(run, FACTS)
    (run / "report.md").unlink()
    (run / "loss.png").unlink()
    summary = write_report(run)
    assert summary["facts"] == FACTS
    assert (run / "loss.png").is_file()
    assert "builtin:tiny-llama" in (run / "report.md").read_text()


def test_non_finite_losses_become_null_in_valid_json(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 2.0 - s / 100} for s in range(1, 10)]
    rows += [{"step": 10, "loss": float("nan")}, {"step": 10, "val_loss": float("inf"), "val_ppl": float("inf")}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = write_report(run, {"final": float("nan")})
    text = (run / "summary.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert summary["final_loss"] is None
    assert summary["final_val_loss"] is None
    assert summary["facts"]["final"] is None
    assert summary["diagnosis"]["verdict"] == "diverging"
    assert (run / "loss.png").is_file()


def test_write_report_refuses_a_directory_that_is_not_a_run(tmp_path: Path):
    with pytest.raises(FtkitError, match="run directory"):
        write_report(tmp_path)


def test_smooth_is_centred_mean_shrinking_at_the_ends():
    assert smooth([1.0, 3.0, 5.0, 7.0], 3) == [2.0, 3.0, 5.0, 6.0]
    assert smooth([1.0, 3.0], 1) == [1.0, 3.0]
