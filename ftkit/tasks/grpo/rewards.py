"""Verifiable rewards for grpo: built-in ones and a user's functions, called on batches.

Every reward is called TRL's way, on a batch:

    reward(prompts=[str], completions=[str], <column>=[value per row] for every data column) -> [float]

(prompts as rendered for generation, completions as decoded text without the end-of-turn token.)
The total is Σ weight_k · reward_k; each reward is also logged on its own.

Built-in (`name:`):
    exact_match   1.0 when completion.strip() == answer.strip(), else 0.0
    regex         1.0 when re.search(pattern, completion) finds a match, else 0.0
    json          1.0 when the completion (stripped) parses as JSON, else 0.0
    field_f1      F1 of the fields of an `act(key[value], ...)` string (the quickstart's
                  inform(name[...], release_year[...], ...)) against the answer's: the fields are
                  the (key, value) pairs plus ("act", act); precision = shared / completion's,
                  recall = shared / answer's; 0.0 when either has none

A user's reward (`function: FILE.py:NAME`) is imported from that local file when training starts
(the recipe checked that the file defines NAME). Anything it does wrong names the row: an exception
(the batch is re-scored one row at a time to find the row that raises), a result that is not one
number per completion, or a value that is not a finite number.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.errors import DataError, FtkitError, ModelError
from ftkit.recipe.schema import RewardSpec

RewardFn = Callable[..., Sequence[float]]
#: built-in rewards that compare with the row's `answer` column
NEEDS_ANSWER = ("exact_match", "field_f1")
FIELD = re.compile(r"([A-Za-z_][\w ]*?)\s*\[([^\]]*)\]")


class RewardError(FtkitError):
    """A reward function failed or returned something unusable while training (exit 1; the last checkpoint stays)."""

    exit_code = 1


def exact_match(completions: list[str], answer: list[str | None], **_: Any) -> list[float]:
    return [float(a is not None and c.strip() == a.strip()) for c, a in zip(completions, answer, strict=True)]


def regex_reward(pattern: str) -> RewardFn:
    compiled = re.compile(pattern)

    def regex(completions: list[str], **_: Any) -> list[float]:
        return [float(compiled.search(c) is not None) for c in completions]

    return regex


def parses_as_json(completions: list[str], **_: Any) -> list[float]:
    def ok(text: str) -> bool:
        try:
            json.loads(text.strip())
        except ValueError:
            return False
        return True

    return [float(ok(c)) for c in completions]


def fields_of(text: str) -> set[tuple[str, str]]:
    """{("act", act)} ∪ {(key, value)} of an `act(key[value], ...)` string; empty when it has no fields."""
    pairs = {(key.strip(), value.strip()) for key, value in FIELD.findall(text)}
    if not pairs:
        return set()
    act = text.strip().split("(", 1)[0].strip()
    return pairs | ({("act", act)} if act else set())


def field_f1_score(completion: str, answer: str) -> float:
    got, want = fields_of(completion), fields_of(answer)
    shared = len(got & want)
    if not got or not want or not shared:
        return 0.0
    precision, recall = shared / len(got), shared / len(want)
    return 2 * precision * recall / (precision + recall)


def field_f1(completions: list[str], answer: list[str | None], **_: Any) -> list[float]:
    return [0.0 if a is None else field_f1_score(c, a) for c, a in zip(completions, answer, strict=True)]


def load_function(spec: str) -> RewardFn:
    """The function NAME of `FILE.py:NAME` (an absolute path once the recipe is loaded); ModelError if it
    cannot be imported or is not callable."""
    file_text, name = spec.rsplit(":", 1)
    path = Path(file_text)
    module_name = f"ftkit_reward_{path.stem}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's module may raise anything while it is imported
        raise ModelError(
            f"objective.rewards: importing {path} failed: {type(err).__name__}: {err}; fix the file"
        ) from err
    function = getattr(module, name, None)
    if not callable(function):
        raise ModelError(f"objective.rewards: {path.name}:{name} is not a function; name a function in that file")
    return function


@dataclass
class Reward:
    """One reward of the recipe, ready to call: its label in metrics, weight and function."""

    label: str
    weight: float
    function: RewardFn
    needs_answer: bool = False


def build_rewards(specs: Sequence[RewardSpec]) -> list[Reward]:
    """The recipe's rewards, user functions imported; labels made unique (`score`, `score_2`)."""
    builtin = {"exact_match": exact_match, "json": parses_as_json, "field_f1": field_f1}
    rewards, seen = [], {}
    for spec in specs:
        if spec.function is not None:
            function = load_function(spec.function)
        elif spec.name == "regex":
            function = regex_reward(spec.pattern or "")
        else:
            function = builtin[spec.name]
        label = spec.label
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}_{seen[label]}"
        rewards.append(Reward(label, spec.weight, function, spec.name in NEEDS_ANSWER))
    return rewards


def check_columns(rewards: Sequence[Reward], examples: Sequence[Any], split: str) -> None:
    """DataError naming the first row without an `answer` when a reward compares with it."""
    needing = [r.label for r in rewards if r.needs_answer]
    if not needing:
        return
    for example in examples:
        if example.answer is None:
            raise DataError(
                f"{example.source}: reward {needing[0]} compares with the row's 'answer', which it lacks "
                f"({split}); add an answer to every row or use another reward"
            )


def score(
    rewards: Sequence[Reward], prompts: list[str], completions: list[str], examples: Sequence[Any]
) -> tuple[list[float], dict[str, list[float]]]:
    """(total reward per completion, {label: values}); `examples[i]` is completion i's row (its columns are
    passed as keyword lists). RewardError naming the row when a reward fails."""
    columns = sorted({key for example in examples for key in example.columns} - {"prompts", "completions"})
    kwargs = {key: [example.columns.get(key) for example in examples] for key in columns}
    per_reward: dict[str, list[float]] = {}
    for reward in rewards:
        values = _call(reward, prompts, completions, kwargs, examples)
        per_reward[reward.label] = values
    total = [sum(r.weight * per_reward[r.label][i] for r in rewards) for i in range(len(completions))]
    return total, per_reward


def _call(reward: Reward, prompts: list[str], completions: list[str], kwargs: dict, examples: Sequence[Any]) -> list:
    try:
        out = reward.function(prompts=prompts, completions=completions, **kwargs)
    except Exception as err:  # a user's function may raise anything: find and name the row
        row = _failing_row(reward, prompts, completions, kwargs)
        where = examples[row].source if row is not None else f"the batch of {_sources(examples)}"
        raise RewardError(
            f"reward {reward.label} raised {type(err).__name__}: {err} on {where}; fix the function or the row"
        ) from err
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise RewardError(
            f"reward {reward.label} returned {type(out).__name__} for {len(completions)} completions "
            f"({_sources(examples)}); it must return one number per completion"
        ) from None
    if len(values) != len(completions):
        raise RewardError(
            f"reward {reward.label} returned {len(values)} values for {len(completions)} completions "
            f"({_sources(examples)}); it must return one number per completion"
        )
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise RewardError(
                f"reward {reward.label} returned {value} for a completion of {examples[i].source}; "
                "rewards must be finite numbers"
            )
    return values


def _failing_row(reward: Reward, prompts: list[str], completions: list[str], kwargs: dict) -> int | None:
    for i in range(len(completions)):
        try:
            reward.function(
                prompts=prompts[i : i + 1],
                completions=completions[i : i + 1],
                **{key: values[i : i + 1] for key, values in kwargs.items()},
            )
        except Exception:  # noqa: BLE001 (looking for the row that raises, whatever it raises)
            return i
    return None


def _sources(examples: Sequence[Any]) -> str:
    names = list(dict.fromkeys(example.source for example in examples))
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
