"""Fault injection for the reliability tests: what happens at ftkit's fault points.

    FTKIT_TEST_FAULT="ACTION@POINT:STEP[,ACTION@POINT:STEP ...]"

POINT is one of ftkit.train.faults.POINTS (after a step, or a phase of a checkpoint save).
ACTION is what happens there:
    kill             SIGKILL this process: a real `kill -9`, no cleanup of any kind runs
    sigint, sigterm  send that signal to this process (the path a user's Ctrl-C or a scheduler takes)
    stall            print "ftkit-test-fault: stalled at POINT:STEP" on stderr, then sleep 60 s
                     (so a test can send signals while the process is inside that point)
    crash            raise RuntimeError (an in-process crash: finally-blocks run)

In-process tests install the injector of a spec while they train (`injected(spec)`). A child
process (`python -m ftkit`, and the processes `--nproc` starts) gets it from its environment:
`subprocess_env(spec)` sets FTKIT_TEST_FAULT and puts tests/support/fault_site, whose
sitecustomize.py installs the injector at interpreter start, on PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ftkit.io import messages
from ftkit.train import faults
from ftkit.train.faults import POINTS

ENV = "FTKIT_TEST_FAULT"
ACTIONS = ("kill", "sigint", "sigterm", "stall", "crash")
ROOT = Path(__file__).resolve().parents[2]
#: the folder whose sitecustomize.py installs FTKIT_TEST_FAULT's injector in a child process
SITE = Path(__file__).resolve().parent / "fault_site"


def parse(spec: str) -> list[tuple[str, str, int]]:
    """`"kill@step:3,stall@save-weights:4"` -> [("kill", "step", 3), ("stall", "save-weights", 4)]."""
    found = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        action, _, where = item.partition("@")
        point, _, step = where.rpartition(":")
        if action not in ACTIONS or point not in POINTS or not step.isdigit():
            raise ValueError(f"{ENV}: cannot read {item!r}; write ACTION@POINT:STEP with ACTION in {ACTIONS}")
        found.append((action, point, int(step)))
    return found


def injector(spec: str) -> faults.Injector:
    """The injector that fires the faults of `spec` at their points."""
    planned = parse(spec)

    def inject(point: str, step: int) -> None:
        for action, at, at_step in planned:
            if at == point and at_step == step:
                fire(action, f"{point}:{step}")

    return inject


def fire(action: str, where: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action in ("sigint", "sigterm"):
        # raise_signal delivers to this thread at once, so ftkit's handler has run when it returns;
        # os.kill(getpid()) may land on a busy worker thread and arrive a step late under load
        signal.raise_signal(signal.SIGINT if action == "sigint" else signal.SIGTERM)
    elif action == "stall":
        # ftkit's stderr (sys.stderr is the library log while a command runs)
        messages().write(f"ftkit-test-fault: stalled at {where}\n")
        messages().flush()
        time.sleep(60)
    else:
        raise RuntimeError(f"injected fault at {where}")


@contextmanager
def injected(spec: str | None) -> Iterator[None]:
    """The faults of `spec` armed in this process while inside (none for None)."""
    with faults.installed(injector(spec) if spec else None):
        yield


def install_from_env() -> None:
    """Arm the faults FTKIT_TEST_FAULT names, if it is set (a child process, at start)."""
    spec = os.environ.get(ENV)
    if spec:
        faults.install(injector(spec))


def subprocess_env(spec: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a child `python -m ftkit ...` that fires the faults of `spec`:
    this one, ftkit importable from the repository, the fault site on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SITE)]), **extra}
    env.pop(ENV, None)
    if spec:
        env[ENV] = spec
    return env
