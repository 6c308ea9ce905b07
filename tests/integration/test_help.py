"""`--help` reads like a standard command line: flags alone, values with capital metavars, one line per command."""

from __future__ import annotations

import re

import pytest
import typer

from ftkit.cli import app
from tests.support.helpers import run_cli

GROUP = typer.main.get_command(app)
COMMANDS = list(GROUP.commands)


def test_the_command_list_has_one_line_per_command():
    code, out, _ = run_cli("--help")
    assert code == 0
    listed = out.split("Commands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in listed] == COMMANDS  # no continuation lines
    assert all(len(line) <= 80 for line in listed)


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_options_show_capital_metavars_and_flags_show_none(command):
    code, out, _ = run_cli(*([command] if command else []), "--help")
    assert code == 0
    assert not re.search(r"<(bool|str|int|float|path|list)", out), out
    params = (GROUP.commands[command] if command else GROUP).params
    out = out.split("Arguments:\n" if "Arguments:\n" in out else "Options:\n", 1)[1]
    for param in params:
        names = ", ".join([*param.opts, *param.secondary_opts])
        if param.param_type_name == "argument":
            assert re.search(rf"^  {re.escape(param.metavar)}\s", out, re.M), param.name
            assert param.metavar.isupper()
        elif param.is_flag:
            assert re.search(rf"^  {re.escape(names)}(\s\s|$)", out, re.M), names
        else:
            shown = re.search(rf"^  {re.escape(names)} (\S+)", out, re.M)
            assert shown, names
            assert re.fullmatch(r"[A-Z_=]+|\[[a-z0-9_|-]+\]", shown.group(1)), shown.group(0)


def test_usage_line_names_arguments_in_capitals():
    _, out, _ = run_cli("eval", "--help")
    assert out.splitlines()[0].endswith("eval [OPTIONS] RUN_OR_MODEL")
    _, out, _ = run_cli("train", "--help")
    assert out.splitlines()[0].endswith("train [OPTIONS] RECIPE [CHECKPOINT]")


def test_a_mistyped_command_is_a_usage_error_with_the_nearest_command():
    code, out, err = run_cli("evl", "runs/a")
    assert (code, out) == (2, "")
    assert "No such command 'evl'. Did you mean 'eval'?" in err
