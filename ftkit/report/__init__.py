"""Metrics → summary, plot, report and a plain-language diagnosis of a run.

Everything here reads the run directory only (metrics.jsonl, summary.json, samples.jsonl),
so `ftkit report RUN` can rewrite the three outputs long after training ended:

    summary.json   facts from the trainer + figures derived from the metrics + diagnosis
    loss.png       train loss (raw, faint, and smoothed) and val_loss against step
    report.md      what ran, the curves, first/last/best figures, diagnosis, samples

Imports stay light: matplotlib is imported only inside the plotting function.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import RunDirError
from ftkit.io import write_atomic
from ftkit.rundir import EVAL_GLOB, METRICS, PLOT, REPORT, SAMPLES, SUMMARY
from ftkit.tasks import task_of_run

METRICS_FILE, SUMMARY_FILE, SAMPLES_FILE, PLOT_FILE, REPORT_FILE = METRICS, SUMMARY, SAMPLES, PLOT, REPORT

# Diagnosis thresholds. Trends compare *means of thirds* of the curve, so single noisy
# micro-batches cannot flip a verdict.

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
# Final losses are averaged over this many logged steps, to damp batch-to-batch noise.
FINAL_LOSS_WINDOW = 5
# Samples shown in report.md; more makes the report long without telling more.
MAX_SAMPLES_SHOWN = 20

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


# ---------------------------------------------------------------- reading


def read_metrics(path: Path) -> list[dict]:
    """Read metrics.jsonl: one JSON object per line, in order.

    Blank lines are skipped. An unparseable *last* line is skipped too: it is a line
    torn by a crash or kill mid-write, and the rest of the run is still worth reporting.
    An unparseable line anywhere else means the file is damaged: raises RunDirError
    (an FtkitError) naming `path:line`. NaN/Infinity are accepted, as json writes them.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RunDirError(f"{path}: cannot read metrics ({err.strerror})") from err
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    records: list[dict] = []
    for i, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(numbered) - 1:
                break
            raise RunDirError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or delete this line") from err
        if not isinstance(record, dict):
            raise RunDirError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def split_curves(records: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, val) as (step, loss) pairs; an eval record is one that has "val_loss"."""
    train: list[tuple[int, float]] = []
    val: list[tuple[int, float]] = []
    for r in records:
        if "val_loss" in r:
            val.append((int(r["step"]), _as_float(r["val_loss"])))
        elif "loss" in r:
            train.append((int(r["step"]), _as_float(r["loss"])))
    return train, val


def _as_float(value: Any) -> float:
    """A logged loss as float; null (a loss that could not be serialised) reads as NaN."""
    return float("nan") if value is None else float(value)


# ---------------------------------------------------------------- diagnosis


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


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average over `window` points (shrinking at the ends).

    Centred rather than trailing, so the smoothed curve does not lag the raw one on the plot.
    """
    half = window // 2
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


# ---------------------------------------------------------------- summary


def summarize(records: list[dict], facts: dict) -> dict:
    """The summary.json content: facts, figures derived from the metrics, and the diagnosis."""
    train, val = split_curves(records)
    last_train = [v for _, v in train[-FINAL_LOSS_WINDOW:]]
    finite_val = [(s, v) for s, v in val if math.isfinite(v)]
    best = min(finite_val, key=lambda p: p[1]) if finite_val else None
    diagnosis = diagnose(train, val)
    summary = {
        "facts": facts,
        "first_loss": train[0][1] if train else None,
        "final_loss": _mean(last_train) if last_train else None,
        "first_val_loss": val[0][1] if val else None,
        "final_val_loss": val[-1][1] if val else None,
        "best_val_loss": best[1] if best else None,
        "best_step": best[0] if best else None,
        "last_step": max((s for s, _ in train + val), default=None),
        "n_logged_steps": len(train),
        "n_evals": len(val),
        "diagnosis": asdict(diagnosis),
    }
    task = task_of_run(facts)
    section = task.summarize(records, facts)
    if section is not None:
        summary[task.summary_key] = section
    return summary


def json_safe(value: Any) -> Any:
    """A copy with NaN/±inf floats as None, so the JSON is valid for every reader."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------- entry point


def write_report(run_dir: Path, facts: dict | None = None) -> dict:
    """Write summary.json, loss.png and report.md into `run_dir`; return the summary dict.

    `facts` come from the trainer (model, method, params, data sizes, timing ...; every key
    optional). When None they are read back from the existing summary.json, so the report
    can be rebuilt from the run directory alone. A missing metrics.jsonl reads as no metrics.
    """
    run_dir = Path(run_dir)
    metrics_path, summary_path = run_dir / METRICS_FILE, run_dir / SUMMARY_FILE
    if not run_dir.is_dir() or not (metrics_path.is_file() or summary_path.is_file()):
        raise RunDirError(f"{run_dir}: no {METRICS_FILE} or {SUMMARY_FILE}; give a run directory from `ftkit train`")
    if facts is None:
        facts = _read_facts(summary_path)
    records = read_metrics(metrics_path) if metrics_path.is_file() else []
    summary = json_safe(summarize(records, dict(facts)))
    write_atomic(summary_path, (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
    train, val = split_curves(records)
    plot_loss(train, val, run_dir / PLOT_FILE, title=_title(summary["facts"]))
    samples = _read_samples(run_dir / SAMPLES_FILE)
    markdown = render_markdown(summary, samples) + _evaluation_section(newest_eval(run_dir))
    write_atomic(run_dir / REPORT_FILE, markdown.encode())
    return summary


def _read_facts(summary_path: Path) -> dict:
    """The "facts" of an earlier summary.json, or {} when there is none yet."""
    if not summary_path.is_file():
        return {}
    try:
        return json.loads(summary_path.read_text(encoding="utf-8")).get("facts") or {}
    except (json.JSONDecodeError, AttributeError) as err:
        raise RunDirError(f"{summary_path}: not a valid summary ({err}); pass the facts or delete it") from err


def _read_samples(path: Path) -> list[dict] | None:
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


def _evaluation_section(result: dict | None) -> str:
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


def _title(facts: dict) -> str:
    parts = [str(facts[k]) for k in ("model", "method") if facts.get(k)]
    return " · ".join(parts) or "ftkit run"


# ---------------------------------------------------------------- plot


def plot_loss(train: list[tuple[int, float]], val: list[tuple[int, float]], path: Path, title: str) -> None:
    """Plot train loss (raw faint + smoothed) and val loss against step to `path` (PNG).

    Non-finite points are skipped. The y axis is logarithmic when the losses span more
    than 10×, so the late, small changes stay visible next to the first steps.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede the pyplot import
    import matplotlib.pyplot as plt

    train = [(s, v) for s, v in train if math.isfinite(v)]
    val = [(s, v) for s, v in val if math.isfinite(v)]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if train:
            steps, losses = [s for s, _ in train], [v for _, v in train]
            ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label="train loss")
            window = max(1, len(losses) // 20)  # ~20 windows: smooth enough, still shows the shape
            ax.plot(steps, smooth(losses, window), color="tab:blue", linewidth=2, label="train (smoothed)")
        if val:
            steps, losses = [s for s, _ in val], [v for _, v in val]
            ax.plot(steps, losses, color="tab:orange", marker="o", linewidth=1.5, label="val loss")
            best_step, best = min(val, key=lambda p: p[1])
            ax.axvline(best_step, color="tab:orange", linestyle=":", linewidth=1)
            ax.plot(
                [best_step],
                [best],
                marker="*",
                markersize=14,
                color="tab:red",
                linestyle="none",
                label=f"best val (step {best_step})",
            )
        values = [v for _, v in train + val]
        if values and min(values) > 0 and max(values) / min(values) > 10:
            ax.set_yscale("log")
        if not values:
            ax.text(0.5, 0.5, "no finite losses logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if values:
            ax.legend()
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- markdown


def render_markdown(summary: dict, samples: list[dict] | None) -> str:
    """report.md: title, what ran, curves, figures, diagnosis, and samples when given."""
    facts = summary.get("facts") or {}
    parts = [
        f"# {_title(facts)}\n",
        "## What ran\n",
        _table(["", ""], _what_ran_rows(facts)),
        "## Curves\n",
        f"![loss]({PLOT_FILE})\n",
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
        ["wall time", _duration(f("wall_s"))],
        ["tokens/s", _num(f("tokens_per_s"), ".0f")],
        ["peak memory", _memory(f("peak_mem_bytes"), f("device"))],
        ["device", _s(f("device"))],
        ["status", _s(f("status"))],
    ]
    return rows


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
        lines.append(f"({len(samples) - len(shown)} more in {SAMPLES_FILE})\n")
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
