"""Output: stdout and stderr routing, library output, atomic writes, and stage → publish of output folders.

stdout is data: only what a command is asked to print goes there. stderr is ftkit's own lines
(progress, results for people, errors).

Libraries print on their own: DeepSpeed's logger writes "Setting accelerator to CPU" to stdout
when accelerate imports it, bitsandbytes logs a failed kernel download, transformers warns about
deprecations. A pipeline such as `ftkit eval RUN --json | jq` must not see that, and a person
reading stderr should see ftkit's lines only. So while a command runs (`reserved()`, entered by
`ftkit.cli.main` before any library is imported) `sys.stdout` and `sys.stderr` are the *library
stream*: what is written there goes to the library log (`RUN/logs/libraries.log` once `ftkit
train` has a run directory, `attach_library_log`), to stderr as well with `--verbose`
(`show_library_output`), and to stderr anyway when it is a logged error (level ERROR and above).
A command writes its output through `data()` (the real stdout) and its lines for people through
`messages()` (the real stderr). A library that binds `sys.stderr` at import time binds the library
stream, which is why `reserved()` must come first.

Outside `reserved()` (ftkit used as a library, or tests calling functions directly) `data()`
is simply `sys.stdout` and `messages()` `sys.stderr`.

Files a person or another program reads are never seen half-written: a file is written
beside its place and renamed (`write_atomic`); an output folder is built in a staging
folder, checked, and renamed into place (`check_out` before, `publish` after). Imports stay light.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ftkit.errors import RunDirError

_data: list[TextIO] = []
_messages: list[TextIO] = []
_library_logs: list[LibraryLog] = []


def data() -> TextIO:
    """Where a command's requested output goes: the real stdout."""
    return _data[-1] if _data else sys.stdout


def messages() -> TextIO:
    """Where ftkit's own lines for people go: the real stderr."""
    return _messages[-1] if _messages else sys.stderr


@contextlib.contextmanager
def reserved(verbose: bool = False) -> Iterator[None]:
    """Within: `data()` / `messages()` are the current stdout / stderr, and `sys.stdout` and
    `sys.stderr` (what libraries print to) are the library stream."""
    real_out, real_err = sys.stdout, sys.stderr
    log = LibraryLog(real_err, verbose)
    stream = _LibraryStream(log, real_err)
    _data.append(real_out)
    _messages.append(real_err)
    _library_logs.append(log)
    previous_factory = logging.getLogRecordFactory()
    logging.setLogRecordFactory(_remembering(previous_factory))
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            yield
    finally:
        stream.flush_partial()
        logging.setLogRecordFactory(previous_factory)
        _library_logs.pop()
        _messages.pop()
        _data.pop()
        log.close()


def show_library_output() -> None:
    """`--verbose`: from now on library output goes to stderr too (what was captured so far first)."""
    if _library_logs:
        _library_logs[-1].show()


def attach_library_log(path: Path) -> None:
    """Keep the library output in `path` (appended): what was captured so far, and from now on."""
    if _library_logs:
        _library_logs[-1].attach(path)


class LibraryLog:
    """Library output of one command: kept in memory until a file is attached, then appended there."""

    def __init__(self, stderr: TextIO, verbose: bool):
        self._stderr, self._verbose = stderr, verbose
        self._pending: list[str] = []
        self._file: TextIO | None = None

    def add(self, text: str, is_error: bool) -> None:
        if self._file is not None:
            self._file.write(text)
        else:
            self._pending.append(text)
        if self._verbose or is_error:
            self._stderr.write(text)
            self._stderr.flush()

    def show(self) -> None:
        if not self._verbose:
            self._verbose = True
            self._stderr.write("".join(self._pending))

    def attach(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.close()
        self._file = path.open("a", encoding="utf-8", buffering=1)
        self._file.write("".join(self._pending))
        self._pending = []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _LibraryStream(io.TextIOBase):
    """`sys.stdout` / `sys.stderr` while a command runs: whole lines to the library log.

    A line written while a log record of level ERROR or above is being emitted (the record's
    message is in the text) is an error, shown on stderr as well."""

    def __init__(self, log: LibraryLog, stderr: TextIO):
        super().__init__()
        self._log, self._stderr, self._partial = log, stderr, ""

    @property
    def encoding(self) -> str:
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # faulthandler and friends need a descriptor: the real stderr's
        return self._stderr.fileno()

    def write(self, text: str) -> int:
        record = getattr(_emitting, "record", None)
        is_error = record is not None and record.levelno >= logging.ERROR and record.getMessage() in text
        self._partial += text
        if "\n" in self._partial:
            complete, _, self._partial = self._partial.rpartition("\n")
            self._log.add(complete + "\n", is_error)
        elif is_error:
            self.flush_partial(is_error)
        return len(text)

    def flush_partial(self, is_error: bool = False) -> None:
        if self._partial:
            self._log.add(self._partial + "\n", is_error)
            self._partial = ""


_emitting = threading.local()


def _remembering(factory):
    """A log record factory that remembers, per thread, the record being emitted."""

    def make(*args, **kwargs):
        record = factory(*args, **kwargs)
        _emitting.record = record
        return record

    return make


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
