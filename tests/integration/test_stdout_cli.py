"""stdout is data, through the CLI: help and command output go to stdout."""

from __future__ import annotations

from tests.support.helpers import run_cli


def test_help_stays_on_stdout_and_command_output_too(tmp_path):
    code, out, err = run_cli("train", "--help")
    assert code == 0 and "Usage" in out
    code, out, _ = run_cli("methods")
    assert code == 0 and "lora" in out
