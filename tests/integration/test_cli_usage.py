"""Usage errors are exit 2 with click's usage text on stderr and nothing on stdout (typer ships its own
click: its exceptions are `typer.TyperException`, not `click.ClickException`)."""

from __future__ import annotations

import pytest

from tests.support.helpers import run_cli


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("compar", "runs/a"), "No such command 'compar'"),
        (("eval", "runs/a", "--format", "yaml"), "Invalid value for '--format'"),
        (("merge", "runs/a", "--out", "merged", "--dtype", "fp8"), "Invalid value for '--dtype'"),
        (("train",), "Missing argument"),
    ],
)
def test_usage_errors_exit_2_on_stderr(args, says):
    code, out, err = run_cli(*args)
    assert code == 2, err
    assert out == ""
    assert says in err
