"""What a run shows while it trains, all on stderr or in the run directory, never on stdout.

Progress     a rich progress bar: step, loss, val_loss, lr, tokens/s, ETA
Records      where the loop's records go: metrics.jsonl and the bar (main process only)
WallClock    the run's wall time, a resumed run's earlier part included
log_to_stderr / no_log   the run's one-line messages (the main process's; the others are silent)
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    """Context manager fed with metric records by the loop's `log` hook."""

    def __init__(self, total_steps: int, start_step: int = 0):
        console = Console(stderr=True)
        # a log file or CI is not a terminal: give the line room instead of rich's 80 columns
        if not console.is_terminal:
            console.width = 160
        self._bar = RichProgress(
            MofNCompleteColumn(),
            BarColumn(bar_width=20),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )
        self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="")
        self._val = ""

    def __enter__(self) -> Progress:
        self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.stop()

    def update(self, record: dict) -> None:
        if "val_loss" in record:
            self._val = f" val_loss {record['val_loss']:.4f}"
            self._bar.update(self._task, info=self._info)
            return
        if "skipped" in record:  # a step whose update was dropped (on_nonfinite: skip)
            self._bar.update(self._task, completed=record["step"], info=f"{self._info} · step skipped")
            return
        self._info = f"loss {record['loss']:.4f}{self._val} lr {record['lr']:.2e} {record['tokens_per_s']:,.0f} tok/s"
        self._bar.update(self._task, completed=record["step"], info=self._info)

    _info = ""


class Records:
    """The loop's records (`Hooks.log`): one JSON line each appended to metrics.jsonl, and the bar.

    Only the main process writes the run directory: built with `metrics=None` (the other
    processes) every call does nothing. The file is line-buffered, so a crash loses one line at most.
    """

    def __init__(self, metrics: Path | None, total_steps: int, start_step: int):
        self._file = metrics.open("a", buffering=1) if metrics is not None else None
        self._bar = Progress(total_steps, start_step=start_step) if metrics is not None else None

    def log(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._bar.update(record)

    def showing(self) -> AbstractContextManager:
        """The progress bar on screen while inside (nothing on the other processes)."""
        return self._bar if self._bar is not None else nullcontext()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> Records:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class WallClock:
    """Wall time of a run: `before` seconds up to the checkpoint it resumed from (0 for a new run)
    plus this process's part since `started` (a `time.perf_counter()` reading). The work redone
    after that checkpoint is not counted twice."""

    started: float
    before: float = 0.0

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def no_log(message: str) -> None:
    """The log of a process that is not the main one: every process runs the same code, one speaks."""
