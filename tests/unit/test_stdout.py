"""stdout is data and stderr is ftkit's: what libraries print or warn while a command runs lands in the
library log (ftkit.io), on stderr only with --verbose or when it is a logged error. (Python warnings take
the same path, sys.stderr; pytest records them instead, so the subprocess test of the quickstart checks those.)"""

from __future__ import annotations

import contextlib
import io
import logging
import sys

from ftkit import io as stdout


def test_library_output_is_kept_off_stdout_and_stderr(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), stdout.reserved():
        print("[WARNING] Setting accelerator to CPU.")  # what DeepSpeed's logger does on import
        print("Failed to load CPU gemm_4bit_forward", file=sys.stderr)  # a library printing to stderr
        stdout.data().write('{"loss": 0.5}\n')
        stdout.messages().write("step 1/10 · loss 0.5\n")
        stdout.attach_library_log(tmp_path / "logs" / "libraries.log")
        print("after the run directory exists")
    assert out.getvalue() == '{"loss": 0.5}\n'
    assert err.getvalue() == "step 1/10 · loss 0.5\n"
    kept = (tmp_path / "logs" / "libraries.log").read_text()
    for line in ("Setting accelerator to CPU", "gemm_4bit_forward", "after the run directory"):
        assert line in kept


def test_a_library_handler_made_inside_writes_to_the_log_and_errors_still_show():
    err = io.StringIO()
    logger = logging.getLogger("some_library")
    logger.propagate = False
    with contextlib.redirect_stderr(err), stdout.reserved():
        handler = logging.StreamHandler()  # binds sys.stderr when the library is imported: the library stream
        logger.addHandler(handler)
        try:
            logger.warning("a harmless notice")
            logger.error("could not open the shard")
        finally:
            logger.removeHandler(handler)
    assert err.getvalue() == "could not open the shard\n"


def test_verbose_shows_library_output_captured_so_far_and_after():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), stdout.reserved():
        print("early notice", file=sys.stderr)
        stdout.show_library_output()
        print("late notice", file=sys.stderr)
    assert err.getvalue() == "early notice\nlate notice\n"


def test_outside_a_command_data_is_plain_stdout_and_messages_plain_stderr():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        stdout.data().write("x")
        stdout.messages().write("y")
    assert (out.getvalue(), err.getvalue()) == ("x", "y")
