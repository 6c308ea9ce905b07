"""One trainer per run directory: the lock it holds, and a new run directory made ready.

Two trainers in one run directory (a job resubmitted while the first still runs) would
interleave checkpoints and metrics; the second is refused instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ftkit.errors import DataError, ModelError, ResourceError, RunDirError
from ftkit.io import messages
from ftkit.rundir import RECIPE, RUN_ENTRIES, is_eval_file


class RunLock:
    """An exclusive, non-blocking flock on the run directory, held for the whole run.

    The lock dies with the process, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl  # POSIX only
        except ImportError:  # not POSIX: no flock; one trainer per run dir is then the user's care
            return
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunDirError(
                f"output_dir: another ftkit process is training in {self.run_dir}; wait for it or stop it first"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def prepare_run_dir(run_dir: Path, overwrite: bool, lock: RunLock) -> bool:
    """Refuse a non-empty run directory unless --overwrite; then remove only ftkit's own entries.

    Takes `lock` before anything is removed. Returns True when the directory was created
    here (so a run that cannot start may remove it again).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output_dir: {run_dir} exists and is not a directory")
    existing = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if existing and not overwrite:
        raise RunDirError(
            f"output_dir: {run_dir} is not empty ({', '.join(existing[:5])}{' …' if len(existing) > 5 else ''}); "
            "pass --overwrite to replace ftkit's files there, --resume to continue it, or --output-dir for a new run"
        )
    ours = [name for name in existing if name in RUN_ENTRIES]
    if ours and RECIPE not in existing:
        raise RunDirError(
            f"output_dir: {run_dir} is not an ftkit run directory (no {RECIPE}) but holds {', '.join(ours)}; "
            "--overwrite replaces only runs ftkit made: choose another --output-dir"
        )
    foreign = [name for name in existing if name not in RUN_ENTRIES and not is_eval_file(name)]
    if existing and foreign:
        print(f"note: --overwrite keeps files ftkit did not make in {run_dir}: {', '.join(foreign)}", file=messages())
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    for name in ours:
        remove_entry(run_dir / name)
    return created


@contextmanager
def removed_on_refusal(run_dir: Path, lock: RunLock, created: bool) -> Iterator[None]:
    """A refusal raised inside, before anything was trained, leaves no half-made run directory:
    the lock is released and the directory removed when this run created it. Refusals are meant to
    come before the directory exists (`setup.check_model`); this catches what only building can find
    (a peft error on the real model) and a machine that lacks room (ResourceError)."""
    try:
        yield
    except (ResourceError, ModelError, DataError):
        lock.release()  # before removing the directory it locks
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def remove_entry(path: Path) -> None:
    """Remove a run entry; a symlink is unlinked, never followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
