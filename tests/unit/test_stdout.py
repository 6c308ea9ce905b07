"""stdout is data: what libraries print while a command runs lands on stderr (ftkit.io)."""

from __future__ import annotations

import contextlib
import io

from ftkit import io as stdout


def test_library_prints_go_to_stderr_and_command_output_to_stdout():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), stdout.reserved():
        print("[WARNING] Setting accelerator to CPU.")  # what DeepSpeed's logger does on import
        stdout.data().write('{"loss": 0.5}\n')
    assert out.getvalue() == '{"loss": 0.5}\n'
    assert err.getvalue() == "[WARNING] Setting accelerator to CPU.\n"


def test_outside_a_command_data_is_plain_stdout():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        stdout.data().write("x")
    assert out.getvalue() == "x"
