"""Output: stdout routing, atomic writes, and stage → publish of output folders.

stdout is data: only what a command is asked to print goes there; everything else goes to stderr.

Libraries print to stdout on their own — DeepSpeed's logger, for one, writes "Setting accelerator
to CPU" to stdout the first time it is imported, which accelerate does inside every
`save_pretrained` once deepspeed is installed. A pipeline such as `ftkit eval RUN --json | jq`
must not see that. So while a command runs, `sys.stdout` *is* stderr (`reserved()`, entered by
`ftkit.cli.main`), and a command writes its output through `data()`, the real stdout.

Outside `reserved()` (ftkit used as a library, or tests calling functions directly) `data()`
is simply `sys.stdout`.

Files a person or another program reads are never seen half-written: a file is written
beside its place and renamed (`write_atomic`); an output folder is built in a staging
folder, checked, and renamed into place (`check_out` before, `publish` after). Imports stay light.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ftkit.errors import RunDirError

_data: list[TextIO] = []


def data() -> TextIO:
    """Where a command's requested output goes: the real stdout."""
    return _data[-1] if _data else sys.stdout


@contextlib.contextmanager
def reserved() -> Iterator[None]:
    """Within: `data()` is the current stdout, and `sys.stdout` (what libraries print to) is stderr."""
    _data.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _data.pop()


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a sibling temp file + os.replace, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_out(out: Path, overwrite: bool, inputs: list[tuple[str, str | None]]) -> None:
    """Refuse an existing --out without --overwrite, and any --out that overlaps an input (what, path)."""
    resolved = out.resolve()
    for what, path in inputs:
        if path and Path(path).exists():
            source = Path(path).resolve()
            if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
                raise RunDirError(f"--out: {out} overlaps the {what} {path}; choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out: {out} is a file; give a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunDirError(f"--out: {out} already exists; pass --overwrite to replace it, or choose another --out")


def publish(staging: Path, out: Path) -> None:
    """Move the verified staging dir to `out`; an existing `out` (--overwrite) is replaced only now."""
    for path in staging.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: Path | str) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (checkpoints, data files, GGUF models)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
