"""`ftkit compare RUN RUN ...`: finished runs side by side: curves, one table, a verdict in words.

    load_run(path) each → check_comparable(runs) → Comparison(rows, verdict) → write_comparison(out)

Runs are compared only when they trained the same task and measured val_loss on the same rows
(summary.json's facts `task` and `val_sha256`, recorded by `ftkit train`); otherwise their
losses mean different things and the command refuses, naming the run that differs.

The outputs, in --out:

    compare.md     the table, the verdict, the picture
    compare.png    train loss and val_loss of every run, by step and by tokens seen
    compare.json   the table and the verdict (what --json prints)
    compare.html   with --html: the same page, the PNG embedded (one self-contained file)

A difference under `TIE` (2 % of the larger value for losses, speed and memory; 2 percentage
points for rates such as exact match) is called a tie: on a few dozen examples or a shared
machine, smaller gaps are noise.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ftkit.errors import ArgumentError, FtkitError, RunDirError
from ftkit.io import check_out, publish, write_atomic
from ftkit.recipe import load_recipe
from ftkit.report.markdown import newest_eval
from ftkit.report.summary import json_safe, read_metrics
from ftkit.rundir import FINAL, METRICS, RECIPE, SUMMARY, is_run_dir

MARKDOWN, PICTURE, TABLE, PAGE = "compare.md", "compare.png", "compare.json", "compare.html"
OUTPUTS = (MARKDOWN, PICTURE, TABLE, PAGE)

#: a relative gap below this (losses, speed, memory) is a tie; for rates, this many points × 100
TIE = 0.02
#: the newest `ftkit eval`'s metrics shown, higher is better for each
EVAL_METRICS = ("exact_match", "normalized_match", "accuracy", "rewards/accuracy")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass
class RunData:
    """One run as compare reads it: its summary facts, curves and newest eval."""

    label: str
    path: Path
    summary: dict
    train: list[tuple[int, float, float]]  # (step, tokens seen, loss)
    val: list[tuple[int, float, float]]  # (step, tokens seen, val_loss)
    evaluation: dict | None

    @property
    def facts(self) -> dict:
        return self.summary.get("facts") or {}


@dataclass
class Comparison:
    """The table (one dict per run, in the order given) and the verdict (sentences)."""

    task: str
    val_sha256: str
    rows: list[dict]
    verdict: list[str]

    def as_json(self) -> dict:
        return json_safe({"task": self.task, "val_sha256": self.val_sha256, "runs": self.rows, "verdict": self.verdict})


# ---------------------------------------------------------------- reading runs


def load_run(path: Path, label: str | None = None) -> RunData:
    """A finished or stopped run's summary, curves and newest eval; RunDirError naming `path` when it is no run."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: not a directory; give run directories that `ftkit train` wrote")
    if not is_run_dir(path) or not (path / METRICS).is_file():
        raise RunDirError(
            f"{path}: not a run directory (no recipe.yaml and metrics.jsonl); give runs `ftkit train` wrote"
        )
    if not (path / SUMMARY).is_file():
        raise RunDirError(f"{path}: the run has no {SUMMARY} yet; run `ftkit report {path}` first")
    try:
        summary = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path / SUMMARY}: cannot read it ({err}); run `ftkit report {path}` to rewrite it") from err
    train, val = curves(read_metrics(path / METRICS))
    return RunData(label or path.name, path, summary, train, val, newest_eval(path))


def curves(records: list[dict]) -> tuple[list[tuple[int, float, float]], list[tuple[int, float, float]]]:
    """(train, val) as (step, tokens seen, loss). Tokens seen add each logged step's `tokens` once per
    step since the previous logged one (exact when every step is logged, train.log_every: 1)."""
    train, val, seen, last_step = [], [], 0.0, 0
    for r in records:
        if "val_loss" in r:
            val.append((int(r["step"]), seen, _float(r["val_loss"])))
        elif "loss" in r and "tokens" in r:
            step = int(r["step"])
            seen += float(r["tokens"]) * max(step - last_step, 1)
            last_step = step
            train.append((step, seen, _float(r["loss"])))
    return train, val


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def labels_for(paths: list[Path]) -> list[str]:
    """Short unique names: each run's folder name, with parent folders added where two names clash."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = 1
    while depth < max(len(p) for p in parts):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return [str(p) for p in paths]


def check_comparable(runs: list[RunData]) -> tuple[str, str]:
    """(task, val_sha256) shared by every run; RunDirError naming the first run that differs or lacks them."""
    for run in runs:
        if "task" not in run.facts or "val_sha256" not in run.facts:
            raise RunDirError(
                f"{run.path}: the run was trained by an older ftkit and records no task or val-set fingerprint "
                f"(facts.task / facts.val_sha256 in {SUMMARY}); retrain it to compare it"
            )
        if run.facts["val_sha256"] is None:
            raise RunDirError(
                f"{run.path}: the run records no val-set fingerprint: it has no validation set (data.val or "
                "data.val_fraction), or its file was gone when training ended; compare ranks runs on val_loss"
            )
    first = runs[0]
    for run in runs[1:]:
        if run.facts["task"] != first.facts["task"]:
            raise RunDirError(
                f"{run.path}: trained task {run.facts['task']}, {first.path} task {first.facts['task']}; "
                "compare runs of one task"
            )
        if run.facts["val_sha256"] != first.facts["val_sha256"]:
            raise RunDirError(
                f"{run.path}: its val_loss is measured on other validation rows than {first.path}'s "
                f"(val_sha256 {run.facts['val_sha256'][:12]} vs {first.facts['val_sha256'][:12]}); "
                "compare runs with the same data.val (or data.train, val_fraction and seed)"
            )
    return first.facts["task"], first.facts["val_sha256"]


def _rank(run_dir: Path) -> int | None:
    """The adapter rank (method.r) of the run's recipe, or None (no rank, or a recipe this ftkit cannot read)."""
    try:
        return getattr(load_recipe(run_dir / RECIPE).method, "r", None)
    except FtkitError:
        return None


def artifact_bytes(run_dir: Path) -> int | None:
    """Bytes of the weights in final/ (the adapter, or the whole model for a full fine-tune)."""
    final = run_dir / FINAL
    if not final.is_dir():
        return None
    return sum(p.stat().st_size for p in final.rglob("*") if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))


# ---------------------------------------------------------------- the table and the verdict


def table_row(run: RunData) -> dict:
    """One run's row: what it trained, what it cost, how good it got."""
    facts, summary = run.facts, run.summary
    on_gpu = facts.get("peak_mem_bytes") is not None
    row = {
        "run": run.label,
        "path": str(run.path),
        "model": facts.get("model"),
        "method": facts.get("method"),
        "rank": _rank(run.path),
        "lr": facts.get("lr"),
        "status": facts.get("status"),
        "trainable_params": facts.get("trainable_params"),
        "trainable_pct": facts.get("trainable_pct"),
        "steps": facts.get("steps"),
        "tokens_seen": facts.get("tokens_seen"),
        "tokens_per_s": facts.get("train_tokens_per_s") or facts.get("tokens_per_s"),
        "wall_s": facts.get("wall_s"),
        "peak_mem_bytes": facts.get("peak_mem_bytes") if on_gpu else facts.get("peak_rss_bytes"),
        "peak_mem_kind": "gpu" if on_gpu else "rss",
        "artifact_bytes": artifact_bytes(run.path),
        "final_val_loss": summary.get("final_val_loss"),
        "best_val_loss": summary.get("best_val_loss"),
        "best_step": summary.get("best_step"),
        "eval": None,
    }
    if run.evaluation is not None:
        tuned = run.evaluation["tuned"]
        row["eval"] = {
            "data": run.evaluation.get("data"),
            "n_examples": run.evaluation.get("n_examples"),
            "created": run.evaluation.get("created"),
            **{k: tuned[k] for k in ("loss", *EVAL_METRICS) if isinstance(tuned.get(k), (int, float))},
        }
    return row


def compare(runs: list[RunData]) -> Comparison:
    task, val_sha = check_comparable(runs)
    rows = [table_row(run) for run in runs]
    return Comparison(task, val_sha, rows, verdict(rows))


def verdict(rows: list[dict]) -> list[str]:
    """Plain sentences: which run is best on val loss, on each eval metric, on speed and on memory, by how much."""
    said = [
        _lowest(rows, "best_val_loss", "best val_loss", "{:.4f}"),
        *_eval_sentences(rows),
        _highest_ratio(rows, "tokens_per_s", "is fastest", "{:,.0f} tokens/s"),
        _lowest_ratio(rows, "peak_mem_bytes", "needs the least memory", _bytes),
    ]
    return [s for s in said if s]


def _valued(rows: list[dict], key: str) -> list[tuple[float, str]]:
    return [(float(r[key]), r["run"]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _lowest(rows: list[dict], key: str, what: str, fmt: str) -> str | None:
    values = sorted(_valued(rows, key))
    if len(values) < 2:
        return None
    (best, name), (second, other) = values[0], values[1]
    tied = [n for v, n in values if (v - best) < TIE * max(abs(v), 1e-12)]
    if len(tied) > 1:
        return f"{_names(tied)} tie on {what} ({fmt.format(best)}; within {TIE:.0%} of each other)."
    gap = (second - best) / abs(second)
    return (
        f"{name} has the lowest {what}: {fmt.format(best)}, {gap:.1%} below the next best "
        f"({other}, {fmt.format(second)})."
    )


def _eval_sentences(rows: list[dict]) -> list[str]:
    """One sentence per eval metric that every run measured on the same data."""
    evals = [r.get("eval") for r in rows]
    if any(e is None for e in evals):
        missing = [r["run"] for r in rows if r.get("eval") is None]
        if len(missing) < len(rows):
            return [f"No eval metric compared: {_names(missing)} not measured with `ftkit eval` yet."]
        return []
    if len({(e.get("data"), e.get("n_examples")) for e in evals}) > 1:
        return ["No eval metric compared: the runs' newest evals used different data; eval them on the same rows."]
    sentences = []
    n = evals[0].get("n_examples")
    for key in EVAL_METRICS:
        values = sorted(((e[key], r["run"]) for e, r in zip(evals, rows, strict=True) if key in e), reverse=True)
        if len(values) != len(rows):
            continue
        best, name = values[0]
        tied = [nm for v, nm in values if best - v < TIE]
        per_example = f"; one example is {1 / n:.1%}" if n else ""
        if len(tied) > 1:
            sentences.append(
                f"{_names(tied)} tie on {key} ({best:.1%}, within {TIE * 100:.0f} points; {n} examples{per_example})."
            )
        else:
            second, other = values[1]
            sentences.append(
                f"{name} has the best {key}: {best:.1%}, {100 * (best - second):.1f} points above "
                f"{other} ({second:.1%}; {n} examples{per_example})."
            )
    return sentences


def _highest_ratio(rows: list[dict], key: str, what: str, fmt: str) -> str | None:
    values = sorted(_valued(rows, key), reverse=True)
    if len(values) < 2:
        return None
    (best, name), (worst, slow) = values[0], values[-1]
    tied = [n for v, n in values if best - v < TIE * best]
    if len(tied) == len(values):
        return f"All runs are equally fast ({fmt.format(best)}, within {TIE:.0%})."
    if len(tied) > 1:
        return f"{_names(tied)} tie as fastest ({fmt.format(best)}); {slow} is slowest ({fmt.format(worst)})."
    return f"{name} {what}: {fmt.format(best)}, {best / worst:.2f}× the slowest ({slow}, {fmt.format(worst)})."


def _lowest_ratio(rows: list[dict], key: str, what: str, fmt: Any) -> str | None:
    values = sorted(_valued(rows, key))
    if len(values) < 2:
        return None
    (best, name), (worst, big) = values[0], values[-1]
    kind = "GPU memory allocated" if rows[0].get("peak_mem_kind") == "gpu" else "process RSS, weights included"
    tied = [n for v, n in values if v - best < TIE * worst]
    if len(tied) == len(values):
        return f"All runs need about the same memory ({fmt(best)}, {kind})."
    who = _names(tied) if len(tied) > 1 else name
    verb = "need" if len(tied) > 1 else what.split()[0]
    return f"{who} {verb} the least memory: {fmt(best)} vs {fmt(worst)} for {big} ({kind})."


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ---------------------------------------------------------------- the outputs


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _num(value: Any, fmt: str) -> str:
    return "–" if not isinstance(value, (int, float)) or not math.isfinite(value) else format(value, fmt)


def display_table(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """(header, rows) for people: the eval columns only for metrics some run has."""
    rows = comparison.rows
    metrics = [k for k in EVAL_METRICS if any(k in (r.get("eval") or {}) for r in rows)]
    header = [
        "run",
        "method",
        "trainable params",
        "tokens/s",
        "wall time",
        "peak memory",
        "weights saved",
        "final val_loss",
        "best val_loss (step)",
        *metrics,
    ]
    body = []
    for r in rows:
        pct = f" ({r['trainable_pct']:.2f} %)" if isinstance(r.get("trainable_pct"), (int, float)) else ""
        best = _num(r.get("best_val_loss"), ".4f") + (f" ({r['best_step']})" if r.get("best_step") else "")
        body.append(
            [
                r["run"],
                str(r.get("method")) + (f" r{r['rank']}" if r.get("rank") else ""),
                _num(r.get("trainable_params"), ",d") + pct,
                _num(r.get("tokens_per_s"), ",.0f"),
                _num(r.get("wall_s"), ".0f") + " s",
                _bytes(r.get("peak_mem_bytes")),
                _bytes(r.get("artifact_bytes")),
                _num(r.get("final_val_loss"), ".4f"),
                best,
                *[_num((r.get("eval") or {}).get(k), ".1%") for k in metrics],
            ]
        )
    return header, body


def plot_comparison(runs: list[RunData]) -> bytes:
    """compare.png: train loss (top) and val_loss (bottom) of every run, by step (left) and tokens seen (right)."""
    fig = Figure(figsize=(11, 7), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex="col")
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors, strict=True):
        for row, points, style in ((0, run.train, {"linewidth": 1.2}), (1, run.val, {"marker": "o", "markersize": 3})):
            finite = [p for p in points if math.isfinite(p[2])]
            if not finite:
                continue
            for col in (0, 1):
                axes[row][col].plot(
                    [p[col] for p in finite], [p[2] for p in finite], color=color, label=run.label, **style
                )
    for col, xlabel in ((0, "step"), (1, "tokens seen")):
        axes[1][col].set_xlabel(xlabel)
    for row, ylabel in ((0, "train loss"), (1, "val_loss")):
        for col in (0, 1):
            ax = axes[row][col]
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            values = [v for line in ax.get_lines() for v in line.get_ydata()]
            if values and min(values) > 0 and max(values) / min(values) > 10:
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{len(runs)} runs: train loss and val_loss by step and by tokens seen")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def render_markdown(comparison: Comparison, runs: list[RunData]) -> str:
    header, body = display_table(comparison)
    lines = [
        f"# Comparison of {len(runs)} runs",
        "",
        f"Task `{comparison.task}`; every val_loss is measured on the same validation rows "
        f"(val_sha256 `{comparison.val_sha256[:12]}`).",
        "",
        "## Verdict",
        "",
        *[f"- {s}" for s in comparison.verdict],
        "",
        "## Runs",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *["| " + " | ".join(cells) + " |" for cells in body],
        "",
        "Tokens/s is training-step throughput; wall time includes loading and evaluation; peak memory is "
        + ("GPU memory allocated" if comparison.rows[0]["peak_mem_kind"] == "gpu" else "the process's peak RSS")
        + "; weights saved is final/'s weight files (the adapter, or the whole model).",
        "",
        f"![train loss and val_loss]({PICTURE})",
        "",
        "## Where the runs are",
        "",
        *[f"- {r['run']}: `{r['path']}`" for r in comparison.rows],
        "",
    ]
    evals = [(r["run"], r["eval"]) for r in comparison.rows if r.get("eval")]
    if evals:
        lines += ["Eval metrics are each run's newest `ftkit eval` result:", ""]
        lines += [
            f"- {name}: {e.get('n_examples')} examples of {e.get('data')}, {e.get('created')}" for name, e in evals
        ]
        lines.append("")
    return "\n".join(lines) + "\n"


def render_html(comparison: Comparison, picture: bytes) -> str:
    header, body = display_table(comparison)
    esc = html.escape
    table = (
        "<table><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in header)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in body)
        + "</table>"
    )
    image = base64.b64encode(picture).decode("ascii")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>ftkit compare</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
        "</style></head><body>"
        f"<h1>Comparison of {len(comparison.rows)} runs</h1>"
        f"<p>Task <code>{esc(comparison.task)}</code>; val_loss on the same validation rows.</p>"
        "<h2>Verdict</h2><ul>" + "".join(f"<li>{esc(s)}</li>" for s in comparison.verdict) + "</ul>"
        f"<h2>Runs</h2>{table}"
        f"<p><img alt='train loss and val_loss' src='data:image/png;base64,{image}' style='max-width:100%'></p>"
        "</body></html>\n"
    )


def write_outputs(directory: Path, comparison: Comparison, runs: list[RunData], with_html: bool) -> list[Path]:
    """Write compare.md / .png / .json (and .html) into `directory`, each atomically; returns the paths."""
    picture = plot_comparison(runs)
    files = {
        PICTURE: picture,
        MARKDOWN: render_markdown(comparison, runs).encode(),
        TABLE: (json.dumps(comparison.as_json(), indent=2) + "\n").encode(),
    }
    if with_html:
        files[PAGE] = render_html(comparison, picture).encode()
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        write_atomic(directory / name, content)
    return [directory / name for name in files]


def compare_runs(
    paths: list[Path],
    out: Path,
    overwrite: bool = False,
    with_html: bool = False,
    labels: list[str] | None = None,
) -> Comparison:
    """`ftkit compare`: read and check every run first, then build the report in a staging folder
    beside --out and rename it into place (an existing --out only with `overwrite`). `labels` name
    the runs in the table (default: their folder names)."""
    runs = read_runs(paths, labels)
    comparison = compare(runs)
    check_out(out, overwrite, [("run", str(p)) for p in paths])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    write_outputs(staging, comparison, runs, with_html)
    publish(staging, out)
    return comparison


def read_runs(paths: list[Path], labels: list[str] | None = None) -> list[RunData]:
    """Every run, labelled; ArgumentError for fewer than two, a run given twice or labels that do not fit."""
    if len(paths) < 2:
        raise ArgumentError("compare: give at least two run directories")
    if labels and (len(labels) != len(paths) or len(set(labels)) != len(labels)):
        raise ArgumentError(f"--label: give one distinct label per run ({len(paths)} runs, {len(labels)} labels)")
    resolved = [Path(p).resolve() for p in paths]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise ArgumentError(f"compare: {paths[i]} is given twice")
    return [load_run(Path(p), label) for p, label in zip(paths, labels or labels_for(paths), strict=True)]


def summary_text(comparison: Comparison) -> str:
    """The verdict for stderr, a line per sentence."""
    return "\n".join(comparison.verdict) + "\n"
