"""Fault points: the named moments of a run where the reliability tests make it fail.

    step             at the step boundary after optimizer step STEP (logged, evaluated, checkpointed)
    save-weights     while checkpoint STEP is staged: after the weights are written
    save-optimizer   after the optimizer state is written
    save-complete    after complete.json is written, before the rename into place
    save-renamed     after the rename, before rotation

The checkpoint writer and the run's stop check call `fault_point(point, step)`. It calls the
injector a test installed (tests/support/faults.py: kill, signal, stall, crash) and does
nothing when none is installed, which is always outside the tests: no environment variable
is read here and the maths of training is never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

POINTS = ("step", "save-weights", "save-optimizer", "save-complete", "save-renamed")

#: `injector(point, step)`, called at every fault point
Injector = Callable[[str, int], None]

_injector: Injector | None = None


def fault_point(point: str, step: int) -> None:
    """Let the installed injector act at (`point`, `step`); a no-op when none is installed."""
    if _injector is not None:
        _injector(point, step)


def install(injector: Injector | None) -> Injector | None:
    """Make `injector` the one `fault_point` calls (None removes it); return the one it replaces."""
    global _injector
    previous, _injector = _injector, injector
    return previous


@contextmanager
def installed(injector: Injector | None) -> Iterator[None]:
    """`injector` installed while inside; the previous one back afterwards."""
    previous = install(injector)
    try:
        yield
    finally:
        install(previous)
