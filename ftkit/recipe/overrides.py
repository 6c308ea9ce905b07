"""`--set key.path=value` overrides, applied onto the loaded recipe before validation.

The value is read by the same safe YAML loader as the file, so `--set train.lr=2e-4`
is a float and `--set method.target_modules=[q_proj,v_proj]` a list; the result is
validated together with the file, so an override can never skip a check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ftkit.recipe.sources import Override, Problem, SourceMap, describe_value, format_path
from ftkit.recipe.yaml_loader import YamlError, load_yaml

_EXAMPLE = "--set train.lr=2e-4"


def parse_overrides(texts: Sequence[str]) -> tuple[list[Override], list[Problem]]:
    """Parse every `key.path=value`; malformed ones become problems, the rest Overrides."""
    overrides, problems = [], []
    for index, text in enumerate(texts):
        try:
            overrides.append(parse_override(text, index))
        except ValueError as err:
            problems.append(Problem(f"--set {text}", "", str(err), (1, index)))
    return overrides, problems


def parse_override(text: str, index: int = 0) -> Override:
    """`train.lr=2e-4` -> Override(path=('train', 'lr'), value=0.0002); ValueError says what is wrong."""
    key, sep, value_text = text.partition("=")
    if not sep:
        raise ValueError(f"expected key.path=value, e.g. {_EXAMPLE}")
    parts = tuple(key.strip().split("."))
    if not all(parts):
        raise ValueError(f"'{key}' is not a key path; write dotted keys, e.g. {_EXAMPLE}")
    try:
        loaded = load_yaml(value_text)
    except YamlError as err:
        raise ValueError(f"cannot read the value '{value_text}': {err.message}") from None
    return Override(text, index, parts, loaded.data, loaded.tokens)


def apply_overrides(data: dict, overrides: Sequence[Override], sources: SourceMap) -> list[Problem]:
    """Set each override's value in `data` (in place), creating missing mappings on the way.

    Applied overrides are recorded in `sources`, so later problems under their paths
    cite them. A parent that exists but is not a mapping (e.g. `--set train.lr.x=1`)
    is a problem rather than silently replaced: the user probably mistyped the path.
    """
    problems = []
    for override in overrides:
        try:
            _set_path(data, override.path, override.value)
        except ValueError as err:
            problems.append(
                Problem(f"--set {override.text}", format_path(override.path), str(err), (1, override.index))
            )
        else:
            sources.add_override(override)
    return problems


def _set_path(data: dict, path: tuple[str, ...], value: Any) -> None:
    node = data
    for depth, key in enumerate(path[:-1]):
        child = node.get(key)
        if child is None:  # absent or `key: null` in the file: a mapping starts here
            child = node[key] = {}
        elif not isinstance(child, dict):
            parent = format_path(path[: depth + 1])
            raise ValueError(f"cannot set a key inside {parent}: it holds {describe_value(child)}, not a mapping")
        node = child
    node[path[-1]] = value
