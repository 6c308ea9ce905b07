"""Recipe keys as text: the type, default and bounds of a schema field, YAML-flavoured.

Shared by docs/recipe.md's generated recipe reference (scripts/gen_recipe_reference.py) and
`ftkit methods NAME`, so both describe a key the same way. Plain text; callers escape.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null", dict: "mapping"}
_BOUNDS = (
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.Lt, "lt", "<"),
)


def type_text(annotation: Any, metadata: list[Any] = ()) -> str:
    """`integer >= 1`, `number in [0, 1)`, `list of string | null`, `` `a` | `b` `` for literals."""
    bounds = {
        sign: yaml_scalar(getattr(m, attr)) for m in metadata for cls, attr, sign in _BOUNDS if isinstance(m, cls)
    }
    members = [a for a in get_args(annotation) if a is not type(None)] if is_optional(annotation) else [annotation]
    text = " | ".join(plain_type(a) for a in members) + _bounds_text(bounds)
    return text + (" | null" if is_optional(annotation) else "")


def _bounds_text(bounds: dict[str, str]) -> str:
    """{'>=': '0', '<': '1'} -> ' in [0, 1)'; {'>=': '1'} -> ' >= 1'."""
    lower = next(((sign, v) for sign, v in bounds.items() if sign.startswith(">")), None)
    upper = next(((sign, v) for sign, v in bounds.items() if sign.startswith("<")), None)
    if lower and upper:
        return f" in {'[' if lower[0] == '>=' else '('}{lower[1]}, {upper[1]}{']' if upper[0] == '<=' else ')'}"
    return "".join(f" {bound[0]} {bound[1]}" for bound in (lower, upper) if bound)


def plain_type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return plain_type(args[0])
    if origin is Literal:
        return " | ".join(f"`{yaml_scalar(a)}`" for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(plain_type(a) for a in args)
    if origin is list:
        return f"list of {plain_type(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(plain_type(a) for a in args) + "]"
    if origin is dict:
        return "mapping"
    if model_in(annotation) is not None:
        return "mapping"
    return _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def default_text(info: FieldInfo) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "**required**"
    value = info.default_factory() if info.default_factory is not None else info.default
    if isinstance(value, BaseModel):
        return "(defaults below)"
    return f"`{yaml_scalar(value)}`"


def yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_scalar(v) for v in value) + "]"
    return str(value)


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model in `Model` or `Model | None`, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [m for m in map(model_in, get_args(annotation)) if m is not None] if get_origin(annotation) else []
    return models[0] if len(models) == 1 else None


def is_optional(annotation: Any) -> bool:
    return type(None) in get_args(annotation)
