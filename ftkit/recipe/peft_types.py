"""The keys of any tuner peft ships, read from peft's own config dataclasses (`method: {name: peft, type: ...}`).

The keys besides `name` and `type` are checked against the fields of peft's config
dataclass for TYPE (`peft.PEFT_TYPE_TO_CONFIG_MAPPING`): unknown keys get a did-you-mean
and the list of valid keys, values are checked against the field's type hint, then the
config is built so peft's own `__post_init__` checks run too.

peft is imported inside the functions: it imports torch (seconds), and only a recipe
that names `method.name: peft` needs it; every other recipe validates without it.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from functools import cache
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ftkit.recipe.sources import describe_value, did_you_mean

#: types that need more than `get_peft_model` + ftkit's objectives, and why
REFUSED = {
    "adalora": "its rank budget needs a per-step update; use method.name: adalora",
    "xlora": "it mixes adapters trained beforehand (config.adapters); train those first, then use peft directly",
    "poly": "its forward needs task_ids, which ftkit's objectives do not pass",
    "multitask_prompt_tuning": "its forward needs task_ids, which ftkit's objectives do not pass",
    "cpt": "it needs per-token CPT masks in the batch, which ftkit's objectives do not build",
}


@dataclasses.dataclass(frozen=True)
class PeftField:
    name: str
    annotation: Any  # resolved type hint, or None when it cannot be resolved
    default: Any  # dataclasses.MISSING when required
    help: str


def _config_classes() -> dict[str, type]:
    """peft's config class of every tuner type of the installed peft, by lower-case type name."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING  # lazy: see the module docstring

    return {str(getattr(key, "value", key)).lower(): cls for key, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def peft_types() -> list[str]:
    """Every tuner type of the installed peft, lower case (`fourierft`, `oft`, ...)."""
    return sorted(_config_classes())


def config_class(peft_type: str) -> type:
    return _config_classes()[peft_type.lower()]


@cache
def _hidden_fields() -> frozenset[str]:
    """Fields ftkit sets: PeftConfig's bookkeeping, and what prompt learning reads from the model."""
    from peft.config import PeftConfig, PromptLearningConfig  # lazy: see the module docstring

    base = {f.name for f in dataclasses.fields(PeftConfig)}
    from_model = {f.name for f in dataclasses.fields(PromptLearningConfig)} - base
    return frozenset(base | (from_model - {"num_virtual_tokens", "modules_to_save"}))


@cache
def fields(peft_type: str) -> tuple[PeftField, ...]:
    """The recipe keys of a peft type: its config dataclass's fields, minus those ftkit fills."""
    cls = config_class(peft_type)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a hint peft cannot resolve at runtime: check names only
        hints = {}
    out = []
    for f in dataclasses.fields(cls):
        if f.name in _hidden_fields() or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append(PeftField(f.name, hints.get(f.name), default, " ".join(str(f.metadata.get("help", "")).split())))
    return tuple(out)


def is_prompt_learning(peft_type: str) -> bool:
    from peft.config import PromptLearningConfig  # lazy: see the module docstring

    return peft_type.lower() in peft_types() and issubclass(config_class(peft_type), PromptLearningConfig)


def problems(peft_type: str, options: dict[str, Any]) -> list[str]:
    """Every problem of `method: {name: peft, type: peft_type, **options}`, one `method.key: ...` line each."""
    known = peft_types()
    kind = peft_type.lower()
    if kind not in known:
        close = difflib.get_close_matches(kind, known, n=1, cutoff=0.6)
        return [f"method.type: unknown peft type {peft_type!r}{did_you_mean(close)}; peft here has: {', '.join(known)}"]
    if kind in REFUSED:
        return [f"method.type: {kind} cannot run through the generic entry: {REFUSED[kind]}"]
    by_name = {f.name: f for f in fields(kind)}
    found = []
    for key, value in options.items():
        if key not in by_name:
            close = difflib.get_close_matches(key, list(by_name), n=1, cutoff=0.6)
            found.append(
                f"method.{key}: not a key of peft type {kind}{did_you_mean(close)}; "
                f"it takes: {', '.join(by_name)} (`ftkit methods peft {kind}` describes them)"
            )
            continue
        message = _type_problem(by_name[key].annotation, value)
        if message:
            found.append(f"method.{key}: {message}; got {describe_value(value)}")
    if found:
        return found
    try:
        build_config(kind, options, "CAUSAL_LM")
    except (ValueError, TypeError) as err:  # peft's __post_init__ checks
        reason = " ".join(str(err).split()) or type(err).__name__
        return [f"method.type: peft rejects these {kind} settings: {reason}"]
    return []


def _type_problem(annotation: Any, value: Any) -> str | None:
    """'should be ...' when `value` does not fit the field's type hint; None when it fits (or cannot be checked)."""
    if annotation is None:
        return None
    try:
        adapter = TypeAdapter(annotation)
    except Exception:  # a type pydantic cannot model (peft-internal classes): peft checks it when built
        return None
    try:
        adapter.validate_python(value)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]["msg"]
        return "should be " + first.removeprefix("Input should be ") if first.startswith("Input should be ") else first
    return None


def build_config(peft_type: str, options: dict[str, Any], task: str) -> Any:
    """peft's config object for `peft_type` with the recipe's options."""
    cls = config_class(peft_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's advice on defaults is for its own users; problems above are ours
        return cls(**options, task_type=task)
