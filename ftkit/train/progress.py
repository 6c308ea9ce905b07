"""What a run shows while it trains, all on stderr or in the run directory, never on stdout.

Progress     on a terminal, a rich progress bar: step, loss, val_loss, lr, tokens/s, ETA
PlainLog     elsewhere (a log file, CI, `nohup … 2>&1 > train.log`), plain lines a person can follow
Records      where the loop's records go: metrics.jsonl and the display (main process only)
WallClock    the run's wall time, a resumed run's earlier part included
human        a number for people: 4 significant digits
log_to_stderr / no_log   the run's one-line messages (the main process's; the others are silent)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from ftkit.io import messages


def human(value: float | int | None) -> str:
    """`value` for people: 4 significant digits (0.07771456688642502 → 0.07771, 23456.7 → 23,460)."""
    if value is None:
        return "none"
    if isinstance(value, int) or not math.isfinite(value) or value == 0:
        return f"{value:,}" if isinstance(value, int) else f"{value:g}"
    if 1e4 <= abs(value) < 1e15:  # large counts read better whole, with separators, than as 2.346e+04
        digits = 3 - int(math.floor(math.log10(abs(value))))
        return f"{round(value, digits):,.0f}"
    return f"{value:.4g}"


def duration(seconds: float) -> str:
    """Seconds for people: 42s, 3m05s, 2h07m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """The rich progress bar on a terminal, fed with the loop's records."""

    def __init__(self, total_steps: int, start_step: int = 0, console: Console | None = None):
        self._bar = RichProgress(
            MofNCompleteColumn(),
            BarColumn(bar_width=20),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console or Console(file=messages()),
            transient=False,
            # library output is ftkit.io's (the library log); the bar must not re-route sys.stdout / stderr
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="")
        self._val = ""

    def __enter__(self) -> Progress:
        self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.stop()

    def step(self, record: dict) -> None:
        self._bar.update(self._task, completed=record["step"])

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


class PlainLog:
    """Progress as plain lines, for a stderr that is not a terminal (a log file, CI).

    A line per logged step (`train.log_every`), thinned to at most one per `min_gap_s`; when
    none was written for `max_gap_s`, the next step writes one whatever log_every says (a step
    longer than that: one per step). Every eval, skipped step and the last step get a line.
    Numbers have 4 significant digits; the ETA is the pace of the steps this process ran so far
    (evals included) times the steps left.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_gap_s: float = 10.0,
        max_gap_s: float = 60.0,
    ):
        self._total, self._start_step = total_steps, start_step
        self._out, self._clock = out, clock
        self._min_gap_s, self._max_gap_s = min_gap_s, max_gap_s
        self._started = clock()
        self._last_line: float | None = None  # clock at the last step line

    def __enter__(self) -> PlainLog:
        self._started = self._clock()
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def step(self, record: dict) -> None:
        """Every step's record: a line when none was written for max_gap_s."""
        now = self._clock()
        if now - (self._last_line if self._last_line is not None else self._started) >= self._max_gap_s:
            self._write_step(record, now)

    def update(self, record: dict) -> None:
        """A logged record (metrics.jsonl's): eval, skipped step, or a logged step."""
        now = self._clock()
        if "val_loss" in record:
            values = " · ".join(
                f"{key} {human(value)}" for key, value in record.items() if key.startswith("val_") and value is not None
            )
            self._write(f"eval at step {record['step']}/{self._total} · {values}")
        elif "skipped" in record:
            self._write(f"step {record['step']}/{self._total} · update skipped: {record['skipped']}")
        elif self._last_line is None or now - self._last_line >= self._min_gap_s or record["step"] >= self._total:
            self._write_step(record, now)

    def _write_step(self, record: dict, now: float) -> None:
        step, elapsed = record["step"], now - self._started
        done = step - self._start_step
        eta = elapsed / done * (self._total - step) if done > 0 else None
        parts = [
            f"step {step}/{self._total}",
            f"epoch {human(record['epoch'])}",
            f"loss {human(record['loss'])}",
            f"lr {human(record['lr'])}",
            f"grad_norm {human(record['grad_norm'])}",
            f"{human(record['tokens_per_s'])} tok/s",
            f"elapsed {duration(elapsed)}",
        ]
        if eta is not None and step < self._total:
            parts.append(f"eta {duration(eta)}")
        self._write(" · ".join(parts))
        self._last_line = now

    def _write(self, line: str) -> None:
        out = self._out or messages()
        out.write(line + "\n")
        out.flush()


def display(total_steps: int, start_step: int) -> Progress | PlainLog:
    """The rich bar when stderr is a terminal, plain lines otherwise."""
    console = Console(file=messages())
    if console.is_terminal:
        return Progress(total_steps, start_step, console)
    return PlainLog(total_steps, start_step)


class Records:
    """The loop's records: `log` (`Hooks.log`) appends one JSON line to metrics.jsonl, shows it and hands it
    to the trackers (train.report_to);
    `step` (`Hooks.progress`, every step's record) only moves the display.

    Only the main process writes the run directory: built with `metrics=None` (the other
    processes) every call does nothing. The file is line-buffered, so a crash loses one line at most.
    """

    def __init__(self, metrics: Path | None, total_steps: int, start_step: int, trackers: Any = None):
        self._file = metrics.open("a", buffering=1) if metrics is not None else None
        self._bar = display(total_steps, start_step) if metrics is not None else None
        self._trackers = trackers  # train.report_to (ftkit.train.trackers.Trackers), main process only

    def log(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._bar.update(record)
            if self._trackers is not None:
                self._trackers.log(record)

    def step(self, record: dict) -> None:
        if self._bar is not None:
            self._bar.step(record)

    def showing(self) -> AbstractContextManager:
        """The progress bar on screen while inside (nothing on the other processes)."""
        return self._bar if self._bar is not None else nullcontext()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._trackers is not None:
            self._trackers.close()
            self._trackers = None

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
    print(message, file=messages(), flush=True)


def no_log(message: str) -> None:
    """The log of a process that is not the main one: every process runs the same code, one speaks."""
