"""report.md: what ran, the curves, first/last/best figures, the diagnosis, the task's section,
samples, and the newest `ftkit eval` result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftkit.report.summary import FINAL_LOSS_WINDOW, read_metrics
from ftkit.rundir import EVAL_GLOB, PLOT, SAMPLES
from ftkit.tasks import task_of_run

# Samples shown in report.md; more makes the report long without telling more.
MAX_SAMPLES_SHOWN = 20


def title(facts: dict) -> str:
    """The run in a few words (model · method), for the report's heading and the plot's title."""
    parts = [str(facts[k]) for k in ("model", "method") if facts.get(k)]
    return " · ".join(parts) or "ftkit run"


def render_markdown(summary: dict, samples: list[dict] | None) -> str:
    """report.md: title, what ran, curves, figures, diagnosis, and samples when given."""
    facts = summary.get("facts") or {}
    parts = [
        f"# {title(facts)}\n",
        "## What ran\n",
        _table(["", ""], _what_ran_rows(facts)),
        "## Curves\n",
        f"![loss]({PLOT})\n",
        "## Figures\n",
        _table(["", "train loss", "val loss"], _figure_rows(summary)),
        _diagnosis_section(summary.get("diagnosis") or {}),
    ]
    task = task_of_run(facts)
    if task.summary_key and summary.get(task.summary_key):
        parts.append(task.report_section(summary[task.summary_key], facts))
    if samples is not None:
        parts.append(_samples_section(samples))
    return "\n".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _what_ran_rows(facts: dict) -> list[list[str]]:
    f = facts.get
    rows = [
        ["model", _s(f("model"))],
        ["method", _s(f("method"))],
        ["trainable params", _params(f("trainable_params"), f("total_params"), f("trainable_pct"))],
        ["data", f"{_count(f('train_examples'))} train / {_count(f('val_examples'))} val examples"],
        ["truncated", _truncated(f("truncated"))],
        ["tokens trained on", _count(f("train_target_tokens"))],
        ["steps / epochs", f"{_count(f('steps'))} / {_num(f('epochs'))}"],
        ["optimizer", _optimizer(facts)],
        ["trained weights", _s(f("trained_weights"))],
        ["wall time", _duration(f("wall_s"))],
        ["tokens/s", _num(f("tokens_per_s"), ".0f")],
        ["peak memory", _memory(f("peak_mem_bytes"), f("device"))],
        ["device", _s(f("device"))],
        ["status", _s(f("status"))],
    ]
    # what the method found out about its trained model (MethodHooks.facts), one row per key
    rows += [[key.replace("_", " "), _method_fact(value)] for key, value in (f("method_facts") or {}).items()]
    return rows


def _method_fact(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    return _s(value)


def _figure_rows(summary: dict) -> list[list[str]]:
    best_step = summary.get("best_step")
    best = _num(summary.get("best_val_loss"), ".4f")
    return [
        ["first", _num(summary.get("first_loss"), ".4f"), _num(summary.get("first_val_loss"), ".4f")],
        [
            f"last (train: mean of last {FINAL_LOSS_WINDOW})",
            _num(summary.get("final_loss"), ".4f"),
            _num(summary.get("final_val_loss"), ".4f"),
        ],
        ["best val", "", best if best_step is None else f"{best} at step {best_step}"],
        ["logged", f"{summary.get('n_logged_steps', 0)} steps", f"{summary.get('n_evals', 0)} evals"],
    ]


def _diagnosis_section(diagnosis: dict) -> str:
    figures = diagnosis.get("figures") or {}
    lines = [
        "## Diagnosis\n",
        f"**{diagnosis.get('verdict', 'n/a')}** — {diagnosis.get('advice', '')}\n",
    ]
    if figures:
        lines.append("What drove it:\n")
        lines += [f"- {_FIGURE_LABELS.get(k, k)}: {_figure(k, v)}" for k, v in figures.items()]
        lines.append("")
    return "\n".join(lines)


_FIGURE_LABELS = {
    "n_train_points": "logged train steps",
    "n_val_points": "evals",
    "first_non_finite_step": "first non-finite loss at step",
    "train_start": "train loss, mean of first third",
    "train_middle": "train loss, mean of middle third",
    "train_end": "train loss, mean of last third",
    "train_change": "train change, middle → last third",
    "best_step": "best val step",
    "val_best": "best val loss",
    "val_end": "last val loss",
    "val_change_since_best": "val now vs its best",
    "val_change": "val change over its last evals",
}


def _figure(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if "change" in key:
        return f"{value:+.1%}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _samples_section(samples: list[dict]) -> str:
    shown = samples[:MAX_SAMPLES_SHOWN]
    n_exact = sum(_is_exact(s) for s in samples)
    lines = ["## Samples\n", f"{n_exact} of {len(samples)} generations match the expected output exactly.\n"]
    for i, s in enumerate(shown, start=1):
        mark = "✓ exact match" if _is_exact(s) else "✗ differs"
        lines.append(f"### Sample {i} — {mark}\n")
        for label, key in (("Prompt", "prompt"), ("Expected", "target"), ("Generated", "generated")):
            lines += [f"{label}:\n", _fenced(str(s.get(key, "")).rstrip("\n")), ""]
    if len(samples) > len(shown):
        lines.append(f"({len(samples) - len(shown)} more in {SAMPLES})\n")
    return "\n".join(lines)


def _is_exact(sample: dict) -> bool:
    """Exact match up to surrounding whitespace (generation often ends with a newline)."""
    return str(sample.get("generated", "")).strip() == str(sample.get("target", "")).strip()


def _fenced(text: str) -> str:
    """A fenced block whose fence is longer than any backtick run inside the text."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


# ---------------------------------------------------------------- evaluation


def read_samples(path: Path) -> list[dict] | None:
    """samples.jsonl rows, or None when the run wrote none."""
    return read_metrics(path) if path.is_file() else None


def newest_eval(run_dir: Path) -> dict | None:
    """The newest `ftkit eval` result in the run (eval-*.json, by its `created` time), or None."""
    found = []
    for path in run_dir.glob(EVAL_GLOB):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # a file being written, or not ours
        if isinstance(result, dict) and isinstance(result.get("tuned"), dict):
            found.append((str(result.get("created", "")), path.name, result))
    return max(found, key=lambda item: item[:2])[2] if found else None


def evaluation_section(result: dict | None) -> str:
    """report.md's "Evaluation" section: the newest eval's metrics, with its base and delta when measured."""
    if result is None:
        return ""
    metrics = [
        k
        for k in ("loss", "perplexity", "token_accuracy", "accuracy", "exact_match", "normalized_match")
        if k in result["tuned"]
    ]
    has_base = isinstance(result.get("base"), dict)
    header = ["", "tuned", "base", "delta"] if has_base else ["", "value"]
    rows = []
    for key in metrics:
        row = [key, _num(result["tuned"][key], ".4f")]
        if has_base:
            row += [_num(result["base"].get(key), ".4f"), _num((result.get("delta") or {}).get(key), "+.4f")]
        rows.append(row)
    where = f"{result.get('n_examples', '?')} examples of {result.get('data', '?')}, {result.get('created', '')}"
    return (
        "\n## Evaluation\n\n"
        + f"`ftkit eval` on {where} ({Path(str(result.get('file', ''))).name}).\n\n"
        + _table(header, rows)
    )


# ---------------------------------------------------------------- formatting


def _s(value: Any) -> str:
    return "n/a" if value is None or value == "" else str(value)


def _num(value: Any, spec: str = "g") -> str:
    return "n/a" if value is None else format(value, spec)


def _count(value: Any) -> str:
    return "n/a" if value is None else f"{value:,}"


def _params(trainable: Any, total: Any, pct: Any) -> str:
    if trainable is None:
        return "n/a"
    if pct is None and total:
        pct = 100 * trainable / total
    text = f"{trainable:,}"
    if total is not None:
        text += f" of {total:,}"
    return text + (f" ({pct:.2f}%)" if pct is not None else "")


def _truncated(truncated: Any) -> str:
    if not isinstance(truncated, dict):
        return _s(truncated)
    return ", ".join(f"{v:,} {k}" for k, v in truncated.items()) + " examples cut at max_length"


def _optimizer(facts: dict) -> str:
    parts = [_s(facts.get("optimizer")), f"lr {_num(facts.get('lr'))}"]
    bs, ga = facts.get("batch_size"), facts.get("grad_accum")
    if bs is not None:
        geometry = f"batch_size {bs}"
        if ga is not None:
            geometry += f" × grad_accum {ga} = {bs * ga} per step"
        parts.append(geometry)
    return ", ".join(parts)


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "n/a"
    minutes, secs = divmod(float(seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:04.1f}s" if minutes else f"{secs:.1f}s"


def _memory(peak_bytes: Any, device: Any) -> str:
    if peak_bytes is None:
        return "n/a on CPU" if device in (None, "cpu") else "n/a"
    return f"{peak_bytes / 2**30:.2f} GiB"
