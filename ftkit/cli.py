"""The `ftkit` command line. Each command is thin: it parses, calls one function, reports.

Imports stay light here (no torch): `ftkit --help` must be instant. Progress and logs
go to stderr; stdout carries only what a command is asked to print (resolved recipe,
--json), so commands compose in shell pipelines.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ftkit.errors import FtkitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune language models from YAML recipes.",
)

_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on failure.")] = False,
) -> None:
    _state["debug"] = debug


SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key: --set train.lr=3e-4 (repeatable)."),
]


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", help="Run directory (overrides output_dir).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing non-empty run directory.")
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Continue from the newest complete checkpoint, or from the one given."),
    ] = None,
) -> None:
    """Train a model as the recipe says; write the run directory."""
    from ftkit.recipe import load_recipe

    resolved = load_recipe(recipe, set_ or [])
    if output_dir is not None:
        resolved.output_dir = str(output_dir)
    from ftkit.train.run import run_training

    run_training(resolved, overwrite=overwrite, resume=resume)


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
) -> None:
    """Print the resolved recipe (defaults filled) to stdout, or every error at once."""
    from ftkit.recipe import dump_recipe, load_recipe

    sys.stdout.write(dump_recipe(load_recipe(recipe, set_ or [])))


@app.command()
def methods(
    name: Annotated[str | None, typer.Argument(help="A method: show its recipe keys.")] = None,
    peft_type: Annotated[
        str | None, typer.Argument(help="With `peft`: a peft tuner type, to show its keys.", metavar="[TYPE]")
    ] = None,
) -> None:
    """List the methods (`ftkit methods`), or one method's recipe keys (`ftkit methods vera`)."""
    from ftkit.methods.catalogue import describe_method, describe_peft_type, list_methods

    if peft_type is not None and name != "peft":
        raise FtkitError(f"methods: a TYPE argument goes with `ftkit methods peft TYPE`, not with {name}")
    if name is None:
        text = list_methods()
    elif peft_type is not None:
        text = describe_peft_type(peft_type)
    else:
        text = describe_method(name)
    sys.stdout.write(text)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="Run directory.")]) -> None:
    """(Re)write summary.json, loss.png and report.md of a run from its metrics."""
    from ftkit.report import write_report

    if not (run_dir / "metrics.jsonl").is_file():
        raise FtkitError(f"{run_dir}: no metrics.jsonl here; give the run directory that `ftkit train` wrote")
    write_report(run_dir)
    typer.echo(f"wrote {run_dir / 'report.md'}", err=True)


def main() -> None:
    """Entry point: run the app, turning known failures into one stderr line and an exit code."""
    try:
        app(standalone_mode=False)
    except FtkitError as err:
        if _state["debug"]:
            raise
        message = str(err)
        sys.stderr.write(("error: " + message if "\n" not in message else message) + "\n")
        sys.exit(err.exit_code)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("aborted\n")
        sys.exit(130)
    except Exception as err:  # click usage errors and the unexpected
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if _state["debug"]:
            raise
        sys.stderr.write(f"error: {type(err).__name__}: {err} (run with --debug for the traceback)\n")
        sys.exit(1)
