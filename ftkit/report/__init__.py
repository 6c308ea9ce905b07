"""Metrics → summary, plot, report and a plain-language diagnosis of a run.

Everything here reads the run directory only (metrics.jsonl, summary.json, samples.jsonl,
eval-*.json), so `ftkit report RUN` can rewrite the three outputs long after training ended:

    summary.json   facts from the trainer + figures derived from the metrics + diagnosis   (summary, diagnosis)
    loss.png       train loss (raw, faint, and smoothed) and val_loss against step         (plot)
    report.md      what ran, the curves, first/last/best figures, diagnosis, samples, eval (markdown)

The task's own figures and section come from `ftkit.tasks` (`task_of_run(facts)`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from ftkit.errors import FtkitError, RunDirError
from ftkit.io import write_atomic
from ftkit.report.diagnosis import Diagnosis, diagnose
from ftkit.report.markdown import evaluation_section, newest_eval, read_samples, render_markdown, title
from ftkit.report.plot import plot_loss
from ftkit.report.routing import routing_section
from ftkit.report.summary import json_safe, read_facts, read_metrics, split_curves, summarize
from ftkit.rundir import METRICS, PLOT, REPORT, SAMPLES, SUMMARY

__all__ = ["Diagnosis", "diagnose", "read_metrics", "refresh_report", "render_markdown", "summarize", "write_report"]


def write_report(run_dir: Path, facts: dict | None = None) -> dict:
    """Write summary.json, loss.png and report.md into `run_dir`; return the summary dict.

    `facts` come from the trainer (model, method, params, data sizes, timing ...; every key
    optional). When None they are read back from the existing summary.json, so the report
    can be rebuilt from the run directory alone. A missing metrics.jsonl reads as no metrics.
    """
    run_dir = Path(run_dir)
    metrics_path, summary_path = run_dir / METRICS, run_dir / SUMMARY
    if not run_dir.is_dir() or not (metrics_path.is_file() or summary_path.is_file()):
        raise RunDirError(f"{run_dir}: no {METRICS} or {SUMMARY}; give a run directory from `ftkit train`")
    if facts is None:
        facts = read_facts(summary_path)
    records = read_metrics(metrics_path) if metrics_path.is_file() else []
    summary = json_safe(summarize(records, dict(facts)))
    write_atomic(summary_path, (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
    train, val = split_curves(records)
    plot_loss(train, val, run_dir / PLOT, title=title(summary["facts"]))
    samples = read_samples(run_dir / SAMPLES)
    markdown = render_markdown(summary, samples) + evaluation_section(newest_eval(run_dir))
    markdown += routing_section(run_dir)
    write_atomic(run_dir / REPORT, markdown.encode())
    return summary


def refresh_report(run_dir: Path) -> None:
    """Rewrite the report of a finished run (e.g. so report.md shows a new `ftkit eval`).

    A directory without summary.json (an adapter or model, not a run) is left alone, and so is
    a run whose files cannot be reported (an FtkitError): it keeps the report it had.
    """
    if (Path(run_dir) / SUMMARY).is_file():
        with contextlib.suppress(FtkitError):
            write_report(run_dir)
