"""A rich progress bar on stderr: step, loss, val_loss, lr, tokens/s, ETA. Never touches stdout."""

from __future__ import annotations

from typing import Any


class Progress:
    """Context manager fed with metric records by the loop's `log` hook."""

    def __init__(self, total_steps: int, start_step: int = 0):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

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
