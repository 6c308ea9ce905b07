"""Starting the processes: `ftkit train --nproc N` through torch.distributed.run, and who each one is.

    is_launched / world_size / rank      this process, as the launcher's environment says
    needs_launch(recipe, nproc)          must `ftkit train` start its processes itself?
    launch(nproc, argv)                  run `python -m ftkit ARGV` in N processes; their exit code
    hand_over_failure(message, code)     a failing process's one-line cause, printed once

The CLI imports this module before it knows whether it will spawn, so it imports no torch
at module level (`ftkit --help` stays fast): torch is imported inside the two functions
that need it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftkit.distributed import DistributedError
from ftkit.io import messages

#: set by torchrun / accelerate launch in every process they start
LAUNCHER_ENV = ("LOCAL_RANK", "WORLD_SIZE")
#: where processes started by `launch` leave their failure for it (a temporary directory)
FAILURE_DIR_ENV = "FTKIT_FAILURE_DIR"


def is_launched() -> bool:
    """True inside a process started by torchrun / accelerate launch / `ftkit train --nproc`."""
    return all(key in os.environ for key in LAUNCHER_ENV)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def needs_launch(recipe: Any, nproc: int | None) -> bool:
    """Whether `ftkit train` must start its processes through torch.distributed.run.

    Yes for `--nproc N` with N > 1, for deepspeed always and for fsdp on a GPU even with one
    process: both engines need a process group (one GPU with ZeRO offload is a real use). No
    inside a process a launcher already started (then --nproc must not be given).
    """
    if is_launched():
        if nproc is not None:
            raise DistributedError(
                f"--nproc {nproc}: this process was started by a launcher already (WORLD_SIZE={world_size()}); "
                "drop --nproc, the launcher decides the number of processes"
            )
        return False
    import torch  # here, not at the top: the CLI imports this module on every command

    if nproc is not None and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise DistributedError(
            f"--nproc {nproc}: only {torch.cuda.device_count()} GPU(s) visible; start at most one process per GPU"
        )
    if nproc is not None and nproc > 1:
        return True
    strategy = recipe.distributed.strategy
    return strategy == "deepspeed" or (strategy == "fsdp" and torch.cuda.is_available())


def argv_without_nproc(argv: Sequence[str]) -> list[str]:
    """`argv` with `--nproc N` / `--nproc=N` removed: what each started process runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run `python -m ftkit ARGV` in `nproc` processes on this machine; return the exit code.

    Uses torch.distributed.run (torchrun) in this process, standalone rendezvous on a free
    local port. When a process fails, torchrun stops the others, which may fail too (their
    peers are gone); each failing process hands its one-line cause to this launcher
    (`hand_over_failure`), which prints the earliest one, the root cause, and returns its
    exit code (2 bad input, 1 runtime, 3 non-finite ...). Multi-node runs use torchrun
    directly (docs/distributed.md).
    """
    # here, not at the top: the CLI imports this module on every command
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1 and print a banner; on CPU give each process its share of the cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    # torchrun's agent logs every worker start, stop and failure; the root cause is printed below
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "ftkit", *argv_without_nproc(argv)]
    )
    failures = Path(tempfile.mkdtemp(prefix="ftkit-launch-"))
    os.environ[FAILURE_DIR_ENV] = str(failures)
    try:
        run(args)
    except ChildFailedError as err:
        reports = [json.loads(path.read_text()) for path in sorted(failures.glob("rank-*.json"))]
        if reports:
            first = min(reports, key=lambda report: report["time"])
            print(first["message"], file=messages())
            return int(first["exit_code"])
        failed_rank, failure = err.get_first_failure()
        if failure.exitcode < 0:
            print(f"error: process {failed_rank} was killed by signal {-failure.exitcode}", file=messages())
            return 128 - failure.exitcode
        print(f"error: process {failed_rank} exited with code {failure.exitcode}", file=messages())
        return failure.exitcode
    except KeyboardInterrupt:
        return 130
    finally:
        os.environ.pop(FAILURE_DIR_ENV, None)
        shutil.rmtree(failures, ignore_errors=True)
    return 0


def hand_over_failure(message: str, exit_code: int) -> bool:
    """Called by a failing process with its one-line cause; True when it must not print it.

    Under `ftkit train --nproc` the line goes to the launcher, which prints only the first
    failure in time (the others are its consequences). Under another launcher every
    process reads the same recipe and data, so a bad-input error (exit 2) is printed by
    rank 0 only; runtime failures by the process that has them.
    """
    failures = os.environ.get(FAILURE_DIR_ENV)
    if failures and is_launched():
        report = {"time": time.time(), "rank": rank(), "exit_code": exit_code, "message": message}
        (Path(failures) / f"rank-{rank()}.json").write_text(json.dumps(report))
        return True
    return is_launched() and exit_code == 2 and rank() != 0
