"""How `ftkit --help` reads: like a standard command line (git, pip, click's own defaults).

    Usage: ftkit eval [OPTIONS] RUN_OR_MODEL
      --baseline          a flag: no placeholder after it
      --max-samples N     a value: its metavar in capitals (or the choices, [alpaca|chat|text])

and the command list shows each command's first docstring line, whole. Typer's own rendering
puts a type after every option (`--baseline <bool>`), which reads as if the flag needed a value;
these two classes, given to typer as `cls=` (its public hook for custom click classes), write
the help from the same parameters instead. Imports stay light (no torch).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from typer.core import TyperCommand, TyperGroup


def metavar(param: Any) -> str:
    """What follows an option that takes a value, or names an argument: capitals or [choice|choice]."""
    choices = param.type_descriptor.choices if param.type_descriptor.is_choice else None
    if choices:
        return "[" + "|".join(str(c.value if isinstance(c, Enum) else c) for c in choices) + "]"
    if param.metavar:
        return param.metavar
    return param.name.upper()


def _is_flag(param: Any) -> bool:
    return bool(getattr(param, "is_flag", False)) or getattr(param, "count", False)


def _extras(param: Any) -> str:
    """`[default: 8; N >= 1]`: the default of an option that has a meaningful one, and its range."""
    extras = []
    default = param.default
    if not param.required and not _is_flag(param) and default not in (None, (), []) and param.show_default:
        extras.append(f"default: {default.value if isinstance(default, Enum) else default}")
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    name = metavar(param) if param.param_type_name == "option" else "value"
    if low is not None and high is not None:
        extras.append(f"{low} <= {name} <= {high}")
    elif low is not None:
        extras.append(f"{name} >= {low}")
    elif high is not None:
        extras.append(f"{name} <= {high}")
    return f"  [{'; '.join(extras)}]" if extras else ""


def help_record(param: Any) -> tuple[str, str] | None:
    """(left column, help) of one parameter in `--help`; None for a hidden one."""
    if getattr(param, "hidden", False):
        return None
    if param.param_type_name == "argument":
        return metavar(param), (param.help or "") + _extras(param)
    names = ", ".join([*param.opts, *param.secondary_opts])
    left = names if _is_flag(param) else f"{names} {metavar(param)}"
    return left, (param.help or "") + _extras(param)


def _usage_piece(param: Any) -> str:
    name = metavar(param)
    if param.nargs != 1:
        name += "..."
    return name if param.required else f"[{name}]"


def _format_params(command: Any, ctx: Any, formatter: Any) -> None:
    records = {"argument": [], "option": []}
    for param in command.get_params(ctx):
        record = help_record(param)
        if record is not None:
            records[param.param_type_name].append(record)
    for title, kind in (("Arguments", "argument"), ("Options", "option")):
        if records[kind]:
            with formatter.section(title):
                formatter.write_dl(records[kind])


def first_line(help_text: str | None) -> str:
    """A command's line in the command list: the first line of its help, whole."""
    return (help_text or "").strip().splitlines()[0] if (help_text or "").strip() else ""


class HelpCommand(TyperCommand):
    """A command whose `--help` shows capitals for values and nothing after flags."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["rich_markup_mode"] = None  # plain click layout; ours is the formatting of the parameters
        super().__init__(*args, **kwargs)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        arguments = [p for p in self.get_params(ctx) if p.param_type_name == "argument"]
        return [self.options_metavar, *(_usage_piece(p) for p in arguments)]

    def format_options(self, ctx: Any, formatter: Any) -> None:
        _format_params(self, ctx, formatter)


class HelpGroup(TyperGroup):
    """The `ftkit` group: the same parameter layout, and one whole line per command."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["rich_markup_mode"] = None
        super().__init__(*args, **kwargs)

    def format_options(self, ctx: Any, formatter: Any) -> None:
        _format_params(self, ctx, formatter)
        rows = [
            (name, first_line(command.help))
            for name in self.list_commands(ctx)
            if (command := self.get_command(ctx, name)) is not None and not command.hidden
        ]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
