"""`method: {name: peft, type: TYPE, ...}`: any tuner peft ships, configured by its own fields.

The keys besides `name` and `type` are checked against the fields of peft's config
dataclass for TYPE (`peft.PEFT_TYPE_TO_CONFIG_MAPPING`): unknown keys get a did-you-mean
and the list of valid keys, values are checked against the field's type hint, then the
config is built so peft's own `__post_init__` checks run too. The catalogue grows with
peft: a new tuner is usable from a recipe with no ftkit code.

Fields ftkit fills itself are not recipe keys: the task type and bookkeeping of
`PeftConfig`, and what prompt-learning methods read from the model (token_dim,
num_layers, ...). A prompt-tuning `TEXT` init gets the base model's tokenizer.
"""

from __future__ import annotations

from typing import Any

from ftkit.methods.adapters import task_type, wrap
from ftkit.methods.base import RunInfo
from ftkit.recipe.peft_types import build_config, fields


def apply(model: Any, config: Any, run: RunInfo) -> Any:
    options = dict(config.options)
    names = {f.name for f in fields(config.type)}
    if "tokenizer_name_or_path" in names and "tokenizer_name_or_path" not in options:
        options["tokenizer_name_or_path"] = model.name_or_path  # prompt tuning's TEXT init: the base's tokenizer
    return wrap(model, build_config(config.type, options, task_type(model)), f"peft (type {config.type})")
