"""Turn pydantic validation errors into recipe problems a user can act on.

Each pydantic error has a `loc` in the schema's terms; the user thinks in key paths of
their file. Two translations bridge them:

- pydantic puts union member labels into `loc`: the method tag
  (('method', 'lora', 'r')) and smart-union labels
  (('method', 'lora', 'target_modules', 'list[str]')). `locate` walks the schema
  alongside `loc` and drops them, so the user sees `method.r`.
- a smart union reports one error per member; when no member got further than the
  value itself, the alternatives become one problem ("should be 'all-linear' or a
  valid list"); otherwise only the member that matched the container is reported.

Every problem then says what was received and what would be accepted.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from ftkit.recipe.methods import METHOD_CONFIGS, MethodConfig
from ftkit.recipe.sources import Problem, SourceMap, describe_value, format_path
from ftkit.recipe.suggestions import did_you_mean, suggest_key, suggest_value
from ftkit.recipe.yaml_loader import Path

_UNION_ORIGINS = (Union, types.UnionType)
_BARE_BOOLS = {"yes", "no", "on", "off"}  # YAML 1.1 booleans nobody means as booleans in a string field
_ROOT_MESSAGE_PATH = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+): (.+)$", re.DOTALL)


@dataclass(frozen=True)
class Location:
    """Where a pydantic `loc` points, in the user's key path and the schema's types."""

    path: Path  # user key path, union labels removed
    owner: type[BaseModel] | None  # the model whose key is path[-1], when there is one
    annotation: Any  # the declared type at `path`; None when unknown
    union_path: Path | None = None  # path of the smart-union value this error sits in
    discriminator: str | None = None  # set when `loc` ends at a discriminated union (method)


def problems_from_validation(error: ValidationError, root: type[BaseModel], sources: SourceMap) -> list[Problem]:
    """One Problem per user-visible mistake in `error`, cited where the user gave the value."""
    located = [(locate(root, err["loc"]), err) for err in _one_rule_per_line(error.errors(include_url=False))]
    problems = []
    for group in _group_union_alternatives(located):
        problems.append(_merged_problem(group, sources) if len(group) > 1 else _problem(*group[0], sources))
    return problems


def _one_rule_per_line(errors: list[dict]) -> list[dict]:
    """A rule may report several problems at once, one `key.path: message` line each; split them."""
    out = []
    for err in errors:
        lines = err["msg"].split("\n") if err["type"] == "value_error" else [err["msg"]]
        out.extend({**err, "msg": line} for line in lines if line.strip())
    return out


def locate(root: type[BaseModel], loc: tuple) -> Location:
    """Walk `root`'s fields along `loc`, dropping union labels; see the module docstring."""
    current: Any = root
    path: list[Any] = []
    owner = None
    union_path = None
    discriminator = None
    for part in loc:
        members = _non_null_members(current)
        if discriminator is not None:  # `part` is the tag, e.g. 'lora'
            current = _tagged_member(members, discriminator, part)
            discriminator = None
            continue
        if len(members) > 1:  # smart union: `part` is a member label, e.g. 'list[str]'
            union_path = tuple(path)
            current = _labelled_member(members, str(part))
            continue
        current = members[0] if members else None
        if _is_model(current):
            info = current.model_fields.get(part) if isinstance(part, str) else None
            owner, current = current, (info.annotation if info else None)
            discriminator = info.discriminator if info and isinstance(info.discriminator, str) else None
        else:
            owner, current = None, _item_type(current, part)
        path.append(part)
    return Location(tuple(path), owner, current, union_path, discriminator)


def _non_null_members(annotation: Any) -> list[Any]:
    """The types a value may have, `None` and `Annotated` stripped: `int | None` -> [int]."""
    if annotation is None:
        return []
    if get_origin(annotation) is Annotated:
        return _non_null_members(get_args(annotation)[0])
    if get_origin(annotation) in _UNION_ORIGINS:
        return [m for arg in get_args(annotation) if arg is not type(None) for m in _non_null_members(arg)]
    return [annotation]


def _tagged_member(members: list[Any], discriminator: str, tag: Any) -> Any:
    for member in members:
        if (
            _is_model(member)
            and discriminator in member.model_fields
            and member.model_fields[discriminator].default == tag
        ):
            return member
    return None


def _labelled_member(members: list[Any], label: str) -> Any:
    """The member pydantic calls `label` ('LoraConfig', "literal['all-linear']", 'list[str]', 'int')."""
    for member in members:
        origin = get_origin(member)
        if _is_model(member) and member.__name__ == label:
            return member
        if origin is Literal and label.startswith("literal["):
            return member
        if origin is not None and label.startswith(f"{getattr(origin, '__name__', '')}["):
            return member
        if isinstance(member, type) and member.__name__ == label:
            return member
    return None


def _item_type(annotation: Any, part: Any) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is list and args:
        return args[0]
    if origin is tuple and args and isinstance(part, int):
        return args[0] if args[-1] is Ellipsis else (args[part] if part < len(args) else None)
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _group_union_alternatives(located: list[tuple[Location, dict]]) -> list[list[tuple[Location, dict]]]:
    """Group errors by the smart-union value they belong to; other errors stay alone.

    If some member got inside the value (e.g. `list[str]` failing at item 0), the
    value's type matched that member and only its deeper errors are kept, each alone.
    """
    groups: list[list[tuple[Location, dict]]] = []
    by_union: dict[Path, list[tuple[Location, dict]]] = {}
    for item in located:
        union_path = item[0].union_path
        if union_path is None:
            groups.append([item])
        elif union_path not in by_union:
            by_union[union_path] = [item]
            groups.append(by_union[union_path])
        else:
            by_union[union_path].append(item)
    result = []
    for group in groups:
        deeper = [item for item in group if item[0].union_path is not None and item[0].path != item[0].union_path]
        result.extend([[item] for item in deeper] if deeper else [group])
    return result


def _problem(location: Location, err: dict, sources: SourceMap) -> Problem:
    kind, path = err["type"], location.path
    if kind == "extra_forbidden":
        return sources.problem(path, _unknown_key_message(location))
    if kind == "missing":
        return sources.problem(path, _missing_message(path), locate=path[:-1])
    if kind == "invalid_key":
        key = err["input"]  # the key as YAML read it; `loc` holds it stringified
        message = f"{describe_value(key)} used as a key; keys are text: quote it"
        return sources.problem(path[:-1], message, locate=(*path[:-1], key))
    if kind == "union_tag_invalid":
        return _unknown_tag_problem(location, err, sources)
    if kind == "union_tag_not_found":
        tags = _tags(location, _discriminator_name(err))
        key = (*path, _discriminator_name(err))
        return sources.problem(key, f"required key missing; one of: {', '.join(tags)}", locate=path)
    if kind == "value_error" and (not path or _ROOT_MESSAGE_PATH.match(_expectation(err))):
        return _root_rule_problem(err, sources)
    return sources.problem(path, _value_message(location, err, _expectation(err), sources))


def _merged_problem(group: list[tuple[Location, dict]], sources: SourceMap) -> Problem:
    """One problem for a value that matched no member of a smart union."""
    location, first = group[0]
    path = location.union_path or location.path
    expectations = list(dict.fromkeys(_expectation(err) for _, err in group))
    merged = Location(path, None, None)
    allowed = [value for loc, _ in group for value in _literal_values(loc.annotation)]
    text = " or ".join(expectations[:1] + [e.removeprefix("should be ") for e in expectations[1:]])
    return sources.problem(path, _value_message(merged, first, text, sources, allowed))


def _unknown_key_message(location: Location) -> str:
    path, owner = location.path, location.owner
    allowed = list(owner.model_fields) if owner is not None else []
    section = format_path(path[:-1])
    choices = [c for c in suggest_key(section, path[-1], allowed) if c != format_path(path)]
    if owner is not None and issubclass(owner, MethodConfig):
        return _unknown_method_key_message(owner, str(path[-1]), choices)
    if choices:
        return "unknown key" + did_you_mean(choices)
    return f"unknown key; {section or 'the top level'} takes: {', '.join(allowed)}"


def _unknown_method_key_message(owner: type[MethodConfig], key: str, choices: list[str]) -> str:
    """A key this method lacks: suggest only keys it has; if the key (or what it means, e.g.
    lora_dropout -> method.dropout) belongs to other methods, say so, then list this method's keys."""
    method, allowed = owner.model_fields["name"].default, list(owner.model_fields)
    own = [c for c in choices if not c.startswith("method.") or c.removeprefix("method.") in allowed]
    if own:
        return "unknown key" + did_you_mean(own)
    meant = [c.removeprefix("method.") for c in choices if c.startswith("method.")]
    wanted = meant[0] if meant else key
    others = [
        name
        for config in METHOD_CONFIGS
        if wanted in config.model_fields and (name := config.model_fields["name"].default) != method
    ]
    belongs = ""
    if others:
        listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        belongs = f" ({f'method.{wanted}' if meant else 'it'} is a key of {listed}, not of {method})"
    return f"unknown key for method {method}{belongs}; method {method} takes: {', '.join(allowed)}"


def _missing_message(path: Path) -> str:
    if path and isinstance(path[-1], int):
        return "missing item (too few values)"
    return "required key missing"


def _unknown_tag_problem(location: Location, err: dict, sources: SourceMap) -> Problem:
    tag = err.get("ctx", {}).get("tag", "")
    tags = _tags(location, _discriminator_name(err))
    key = (*location.path, _discriminator_name(err))
    what = format_path(location.path) or "value"
    return sources.problem(
        key, f"unknown {what} '{tag}'{did_you_mean(suggest_value(tag, tags))}; known: {', '.join(tags)}"
    )


def _tags(location: Location, discriminator: str) -> list[str]:
    """The tags a discriminated union accepts, e.g. the registered method names."""
    members = _non_null_members(location.annotation)
    return [
        str(m.model_fields[discriminator].default) for m in members if _is_model(m) and discriminator in m.model_fields
    ]


def _discriminator_name(err: dict) -> str:
    return err.get("ctx", {}).get("discriminator", "'name'").strip("'")


def _root_rule_problem(err: dict, sources: SourceMap) -> Problem:
    """A rule's problem: cite the key its message starts with ('method.name: ...'), or, when that key
    was left at its default, the nearest section the recipe gives."""
    message = _expectation(err)
    match = _ROOT_MESSAGE_PATH.match(message)
    if match:
        return sources.problem(tuple(match.group(1).split(".")), match.group(2))
    return sources.problem((), message)


def _expectation(err: dict) -> str:
    """What pydantic wanted, phrased for a recipe: 'should be a valid integer'."""
    kind, message = err["type"], err["msg"]
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "should be a mapping (keys indented below it)"
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if message.startswith("Input should be "):
        return "should be " + message.removeprefix("Input should be ")
    return message[:1].lower() + message[1:]


def _value_message(location: Location, err: dict, expectation: str, sources: SourceMap, allowed=None) -> str:
    """`expectation; got <value>`, with a quote-it hint where YAML read text as a bool or number."""
    value, kind = err.get("input"), err["type"]
    if isinstance(value, dict) and kind == "value_error":
        return expectation  # a section-level rule: its message already names the keys
    allowed = list(allowed if allowed is not None else _literal_values(location.annotation))
    token = sources.token(location.path)  # None unless the value was an unquoted scalar
    wants_text = kind in ("string_type", "literal_error") and (not allowed or any(isinstance(a, str) for a in allowed))
    if wants_text and isinstance(value, bool) and token is not None and token.lower() in _BARE_BOOLS:
        quote = f"got {describe_value(value)} from a bare '{token}'; quote it: \"{token}\""
        return quote if not allowed or token in allowed else f"{quote}; {expectation}"
    message = f"{expectation}; got {describe_value(value)}" + did_you_mean(suggest_value(value, allowed))
    if wants_text and token is not None and not isinstance(value, str) and (kind == "string_type" or token in allowed):
        message += f'; quote it: "{token}"'
    return message


def _literal_values(annotation: Any) -> list[Any]:
    """Allowed values of a Literal, also inside a union: Literal['a'] | list[str] -> ['a']."""
    values = []
    for member in _non_null_members(annotation):
        if get_origin(member) is Literal:
            values.extend(get_args(member))
    return values
