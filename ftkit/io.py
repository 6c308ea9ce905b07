"""stdout is data: only what a command is asked to print goes there; everything else goes to stderr.

Libraries print to stdout on their own — DeepSpeed's logger, for one, writes "Setting accelerator
to CPU" to stdout the first time it is imported, which accelerate does inside every
`save_pretrained` once deepspeed is installed. A pipeline such as `ftkit eval RUN --json | jq`
must not see that. So while a command runs, `sys.stdout` *is* stderr (`reserved()`, entered by
`ftkit.cli.main`), and a command writes its output through `data()`, the real stdout.

Outside `reserved()` (ftkit used as a library, or tests calling functions directly) `data()`
is simply `sys.stdout`. Imports stay light.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO

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
