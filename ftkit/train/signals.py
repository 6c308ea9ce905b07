"""SIGINT / SIGTERM → a stop at the next step boundary; a second signal aborts at once.

The handler only records the signal. The loop asks `requested` before every step
(`Hooks.should_stop`), so training ends where its state is exactly resumable; the
run then saves a checkpoint, writes the report and exits 128 + signal (130 for
SIGINT, 143 for SIGTERM). A second signal means "now": `os._exit` without cleanup.
That cannot damage the last complete checkpoint, because checkpoints are only ever
staged elsewhere and renamed into place whole.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from ftkit.train.faults import fault_point
from ftkit.train.loop import TrainState

HANDLED = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + signal number (SIGINT 130, SIGTERM 143)."""
    return 128 + signum


class StopSignals:
    """Context manager: while inside, SIGINT and SIGTERM request a stop instead of killing.

    Python only lets the main thread install handlers; from another thread this does
    nothing and signals keep their previous behaviour.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def should_stop(self, state: TrainState) -> bool:
        """`Hooks.should_stop`, asked at every step boundary.
        The boundary is also a fault point, where the reliability tests stop a run."""
        fault_point("step", state.step)
        return self.requested

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # os.write, not print: the main thread may be inside a write to sys.stderr right now,
        # and a buffered stream refuses reentrant writes.
        name = signal.Signals(signum).name
        if self.signum is not None:
            os.write(2, f"\n{name} again: aborting now; the last complete checkpoint is kept\n".encode())
            os._exit(exit_code(signum))
        self.signum = signum
        os.write(2, f"\n{name}: finishing this step, then saving a checkpoint (send again to abort now)\n".encode())
