"""Where each part of a recipe came from, and problems cited at that place.

A recipe is the YAML file with `--set` overrides applied on top. A problem is cited
as `recipe.yaml:LINE` when the offending key came from the file and as
`--set train.lr=abc` when an override put it there, so the user knows what to edit.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ftkit.recipe.yaml_loader import Path


def format_path(path: Path) -> str:
    """('method', 'target_modules', 0) -> 'method.target_modules[0]'."""
    text = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def did_you_mean(choices: Iterable[str]) -> str:
    """' (did you mean a or b?)', or '' when there is nothing to suggest."""
    choices = list(choices)
    return f" (did you mean {' or '.join(choices)}?)" if choices else ""


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 6, 4, 3


def describe_value(value: Any) -> str:
    """The received value and its YAML type in words: 'the string "abc"', 'the boolean false'.

    Bounded in length and depth (reprlib), so a huge or self-referencing value stays one short line.
    """
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if value is None:
        return "null"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f'the string "{text}"'
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, list):
        return f"the list {_SHORT.repr(value)}"
    if isinstance(value, dict):
        return f"a mapping {_SHORT.repr(value)}"
    if hasattr(value, "isoformat"):  # YAML reads 2024-01-01 as a date
        return f"the {type(value).__name__} {value.isoformat()}"
    return f"the {type(value).__name__} {_SHORT.repr(value)}"


@dataclass(frozen=True)
class Problem:
    """One line of a RecipeError: `where: key.path: message`."""

    where: str  # `recipe.yaml:7`, `recipe.yaml` or `--set train.lr=abc`
    path: str  # dotted key path; empty for problems of the whole document
    message: str
    order: tuple = ()  # sort key: file problems by line, then overrides in the order given

    def __str__(self) -> str:
        return f"{self.where}: {self.path}: {self.message}" if self.path else f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Override:
    """One parsed `--set key.path=value`."""

    text: str  # as the user typed it
    index: int  # position among the --set options, for ordering problems
    path: Path
    value: Any
    tokens: dict[Path, str] = field(default_factory=dict)  # plain-scalar source text, relative to `path`


@dataclass
class SourceMap:
    """Lines of the file's keys and the overrides applied over them."""

    file: str
    root_line: int = 1
    lines: dict[Path, int] = field(default_factory=dict)
    tokens: dict[Path, str] = field(default_factory=dict)
    overrides: list[Override] = field(default_factory=list)

    def add_override(self, override: Override) -> None:
        """Record an applied override: its subtree now comes from the command line, not the file."""
        self.tokens = {p: t for p, t in self.tokens.items() if p[: len(override.path)] != override.path}
        self.tokens.update({(*override.path, *p): t for p, t in override.tokens.items()})
        self.overrides.append(override)

    def token(self, path: Path) -> str | None:
        """Source text of the plain scalar at `path` (e.g. 'no' for a value YAML read as false)."""
        return self.tokens.get(tuple(path))

    def has(self, path: Path) -> bool:
        """True when the file or an override gave `path` (so a problem can be cited there)."""
        return tuple(path) in self.lines or self._override_setting(path) is not None

    def problem(self, path: Path, message: str, locate: Path | None = None) -> Problem:
        """A problem about `path`, cited where `locate` (default: `path`) was given."""
        where, order = self.cite(path if locate is None else locate)
        return Problem(where, format_path(path), message, order)

    def cite(self, path: Path) -> tuple[str, tuple]:
        """(`file:line` or `--set ...`, sort key) for the place that gave `path`.

        An override that set `path` or one of its parents wins (it replaced what the file
        said). Otherwise the file line of `path`, or else of its nearest ancestor the
        file has; a path only an override created (a parent of an override) cites it.
        """
        path = tuple(path)
        index = self._override_setting(path)
        if index is None and path and path not in self.lines:
            index = self._override_below(path)
        if index is not None:
            override = self.overrides[index]
            return f"--set {override.text}", (1, override.index)
        line = self._nearest_line(path)
        return f"{self.file}:{line}", (0, line)

    def _override_setting(self, path: Path) -> int | None:
        for index in reversed(range(len(self.overrides))):
            prefix = self.overrides[index].path
            if path[: len(prefix)] == prefix:
                return index
        return None

    def _override_below(self, path: Path) -> int | None:
        for index in reversed(range(len(self.overrides))):
            if self.overrides[index].path[: len(path)] == path:
                return index
        return None

    def _nearest_line(self, path: Path) -> int:
        for end in range(len(path), 0, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return self.root_line
