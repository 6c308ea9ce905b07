"""Did-you-mean for unknown keys and values: a synonym table, then difflib.

difflib alone cannot map `learning_rate` to `lr` or `lora_r` to `method.r`, yet these
are exactly the names users bring from HF Trainer, axolotl, LLaMA-Factory and
torchtune configs; the table covers them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from functools import cache
from typing import get_args, get_origin

from pydantic import BaseModel

from ftkit.recipe.methods import METHOD_CONFIGS
from ftkit.recipe.schema import Recipe
from ftkit.recipe.sources import did_you_mean  # noqa: F401  (re-exported: the suggestion helpers live here)

# Key names from other tools -> the recipe key paths that mean the same thing.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "learning_rate": ("train.lr",),
    "lora_r": ("method.r",),
    "lora_rank": ("method.r",),
    "rank": ("method.r",),
    "lora_alpha": ("method.alpha",),
    "lora_dropout": ("method.dropout",),
    "lora_target_modules": ("method.target_modules",),
    "num_epochs": ("train.epochs",),
    "num_train_epochs": ("train.epochs",),
    "n_epochs": ("train.epochs",),
    "micro_batch_size": ("train.batch_size",),
    "per_device_train_batch_size": ("train.batch_size",),
    "train_batch_size": ("train.batch_size",),
    "gradient_accumulation_steps": ("train.grad_accum",),
    "gradient_accumulation": ("train.grad_accum",),
    "accumulate_grad_batches": ("train.grad_accum",),
    "lr_scheduler": ("train.scheduler",),
    "lr_scheduler_type": ("train.scheduler",),
    "warmup": ("train.warmup_steps", "train.warmup_ratio"),
    "num_warmup_steps": ("train.warmup_steps",),
    "optim": ("train.optimizer",),
    "eval_steps": ("train.eval_every",),
    "save_steps": ("train.save_every",),
    "logging_steps": ("train.log_every",),
    "save_total_limit": ("train.keep_last",),
    "clip_grad_norm": ("train.max_grad_norm",),
    "gradient_clipping": ("train.max_grad_norm",),
    "bf16": ("train.mixed_precision",),
    "fp16": ("train.mixed_precision",),
    "base_model": ("model.name",),
    "model_name_or_path": ("model.name",),
    "model_name": ("model.name",),
    "model_id": ("model.name",),
    "torch_dtype": ("model.dtype",),
    "load_in_4bit": ("model.quantization",),
    "adapter": ("method.name",),
    "peft_type": ("method.name",),
    "finetuning_type": ("method.name",),
    "dataset": ("data.train",),
    "datasets": ("data.train",),
    "train_file": ("data.train",),
    "val_file": ("data.val",),
    "eval_file": ("data.val",),
    "val_set_size": ("data.val_fraction",),
    "max_seq_length": ("data.max_length",),
    "max_seq_len": ("data.max_length",),
    "sequence_len": ("data.max_length",),
    "cutoff_len": ("data.max_length",),
    "train_on_inputs": ("data.train_on_prompt",),
    "output": ("output_dir",),
    "out_dir": ("output_dir",),
}


def suggest_key(section: str, key: str, allowed: Iterable[str]) -> list[str]:
    """Full key paths the user may have meant by `section.key`.

    In order: a known alias from another tool; a close spelling among the section's
    keys; a close spelling of an alias (`lerning_rate` -> `train.lr`); the same name in
    another section (`method.lr` -> `train.lr`); a close spelling anywhere.
    """
    name = str(key).strip().lower().replace("-", "_")
    if name in SYNONYMS:
        return list(SYNONYMS[name])
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    if close:
        return [prefix + close[0]]
    close = difflib.get_close_matches(name, list(SYNONYMS), n=1, cutoff=0.8)
    if close:
        return list(SYNONYMS[close[0]])
    everywhere = known_key_paths()
    same_name = [path for path in everywhere if path.rsplit(".", 1)[-1] == name]
    if same_name:
        return same_name[:2]
    leaves = {path.rsplit(".", 1)[-1]: path for path in everywhere}
    close = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.8)
    return [leaves[close[0]]] if close else []


def suggest_value(value: object, allowed: Iterable[object]) -> list[str]:
    """The allowed value closest to `value` (case-insensitive): the one it abbreviates, or a close spelling."""
    if not isinstance(value, str) or not value:
        return []
    by_lower = {str(choice).lower(): str(choice) for choice in allowed}
    extended = [choice for lower, choice in by_lower.items() if lower.startswith(value.lower())]
    if len(extended) == 1:  # `all` -> `all-linear`: difflib's ratio is too low for short prefixes
        return extended
    close = difflib.get_close_matches(value.lower(), list(by_lower), n=1, cutoff=0.6)
    return [by_lower[close[0]]] if close else []


@cache
def known_key_paths() -> tuple[str, ...]:
    """Every key path of the schema: 'model.name', 'model.quantization.bits', 'method.r', ..."""
    paths: list[str] = []
    for name, info in Recipe.model_fields.items():
        paths.append(name)
        if name == "method":
            for config in METHOD_CONFIGS:
                paths.extend(f"method.{key}" for key in config.model_fields if f"method.{key}" not in paths)
        else:
            paths.extend(_model_paths(name, info.annotation))
    return tuple(paths)


def _model_paths(prefix: str, annotation: object) -> list[str]:
    model = _model_in(annotation)
    if model is None:
        return []
    paths = []
    for name, info in model.model_fields.items():
        paths.append(f"{prefix}.{name}")
        paths.extend(_model_paths(f"{prefix}.{name}", info.annotation))
    return paths


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The pydantic model in `Model` or `Model | None`, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        models = [m for m in map(_model_in, get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None
