"""loss.png: train loss (raw, faint, and smoothed) and val loss against step.

Drawn on matplotlib's Agg canvas directly (no pyplot): no display is needed on a server, and
no process-wide backend or figure registry is touched by a library call.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


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


def plot_loss(train: list[tuple[int, float]], val: list[tuple[int, float]], path: Path, title: str) -> None:
    """Plot train loss (raw faint + smoothed) and val loss against step to `path` (PNG).

    Non-finite points are skipped. The y axis is logarithmic when the losses span more
    than 10×, so the late, small changes stay visible next to the first steps.
    """
    train = [(s, v) for s, v in train if math.isfinite(v)]
    val = [(s, v) for s, v in val if math.isfinite(v)]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
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
