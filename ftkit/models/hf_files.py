"""The one reader and writer of Hugging Face and peft files in a model or adapter folder.

Configs go through the libraries that own them (`peft.PeftConfig`, `transformers.AutoConfig`,
`GenerationConfig`), never through hand-written JSON, so a field peft or transformers adds
or renames is handled by them. Weights are safetensors only: one file or an index of shards,
split as `save_pretrained` splits them (huggingface_hub's `split_torch_state_dict_into_shards`).

    adapter folder   adapter_config.json + adapter_model.safetensors (peft's layout)
    model folder     config.json (+ generation_config.json) + model.safetensors or shards + index

Reading is lazy where models may not fit in memory: `Weights` opens every shard once and
reads one tensor when asked; `save_sharded` plans the shards from shapes alone and writes
each shard as soon as its tensors have arrived.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from peft import PeftConfig
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from ftkit.errors import ModelError
from ftkit.rundir import BOTTLENECK_WEIGHTS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
#: safetensors' dtype names (file headers) → torch dtypes
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ---------------------------------------------------------------- what a folder holds


def is_adapter_dir(path: Path) -> bool:
    """A peft adapter folder (adapter_config.json, no config.json), such as a LoRA run's final/."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / MODEL_CONFIG).is_file()


def has_adapter_config(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_model_dir(path: Path) -> bool:
    return (Path(path) / MODEL_CONFIG).is_file()


def has_tokenizer(path: Path) -> bool:
    return (Path(path) / TOKENIZER_CONFIG).is_file()


def has_weights(path: Path) -> bool:
    """The folder holds safetensors weights `weight_files` finds (a model's, or an adapter's)."""
    path = Path(path)
    return any((path / name).is_file() for name in (WEIGHTS_INDEX, WEIGHTS, ADAPTER_WEIGHTS))


# ---------------------------------------------------------------- adapter configs (peft)


def adapter_config(adapter_dir: Path) -> PeftConfig:
    """The adapter's peft config, as the concrete class of its peft type (LoraConfig, AdaLoraConfig, ...)."""
    if not has_adapter_config(adapter_dir):  # else peft would take the path for a hub id and download
        raise ModelError(f"{adapter_dir}: no {ADAPTER_CONFIG} here")
    try:
        return PeftConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"{adapter_dir}/{ADAPTER_CONFIG}: cannot read it ({err})") from None


def peft_type(config: PeftConfig) -> str:
    """The config's peft type as written in adapter_config.json: LORA, PROMPT_TUNING, ..."""
    return _enum_value(config.peft_type)


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model an adapter records (`base_model_name_or_path`), or None when it records none."""
    return adapter_config(adapter_dir).base_model_name_or_path or None


def adapter_task_type(adapter_dir: Path) -> str | None:
    """peft's task type of an adapter: CAUSAL_LM, SEQ_CLS, ... (None when it records none)."""
    task = adapter_config(adapter_dir).task_type
    return _enum_value(task) if task is not None else None


def adapter_rank(adapter_dir: Path) -> int:
    """The largest LoRA rank in an adapter (its `r`, or the largest of its rank pattern)."""
    config = adapter_config(adapter_dir)
    ranks = [
        int(getattr(config, "r", 0) or 0),
        *(int(r) for r in (getattr(config, "rank_pattern", None) or {}).values()),
    ]
    return max(ranks)


def point_adapter_to(adapter_dir: Path, base: str | None) -> None:
    """Record `base` as the adapter's base model, so `PeftModel.from_pretrained` needs no guess.

    The config is read and saved by peft, which writes every field of the config class (defaults
    included) and drops keys its class does not know; peft loads the result as it loaded the original.
    """
    config = adapter_config(adapter_dir)
    config.base_model_name_or_path = base
    config.save_pretrained(str(adapter_dir))


def save_adapter_weights(adapter_dir: Path, tensors: dict[str, Any]) -> None:
    """Replace an adapter's weights with `tensors` (keys as peft saves them: no adapter name)."""
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    save_file(tensors, str(Path(adapter_dir) / ADAPTER_WEIGHTS), metadata={"format": "pt"})


# ---------------------------------------------------------------- model configs (transformers)


def model_config(model_dir: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """A local model folder's transformers config (config.json)."""
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"{model_dir}/{MODEL_CONFIG}: cannot read it ({str(err).splitlines()[0]})") from None


def raw_model_config(model_dir: Path) -> dict:
    """config.json as written, for what must be read before transformers may run any of the folder's
    code (`auto_map`: trust_remote_code) or of a folder whose model type transformers may not know."""
    try:
        return json.loads((Path(model_dir) / MODEL_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{model_dir}/{MODEL_CONFIG}: cannot read it ({err})") from None


def architectures(model_dir: Path) -> list[str]:
    """The model classes config.json names (`LlamaForCausalLM`, ...); empty when it names none.
    Read raw: naming a class must not need (or run) the folder's code."""
    return list(raw_model_config(model_dir).get("architectures") or [])


def is_classifier_architecture(names: list[str]) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in names)


def config_labels(model_dir: Path) -> list[str] | None:
    """The class names (id order) config.json records in id2label; None when there is no config.json
    or it records none. Read raw: transformers' config fills `LABEL_0, LABEL_1` for any model, which
    are not labels."""
    if not is_model_dir(model_dir):
        return None
    id2label = raw_model_config(model_dir).get("id2label") or {}
    return [id2label[key] for key in sorted(id2label, key=int)] if id2label else None


def copy_model_config(source_dir: Path, out: Path, dtype: str | None = None, **updates: Any) -> None:
    """The config of `source_dir` into `out` with the new dtype (and `updates` set on it), unquantized,
    and its generation config when it has one. Both are saved by transformers (config.json holds
    the values that differ from the class defaults; loading fills the rest)."""
    config = model_config(source_dir)
    if hasattr(config, "quantization_config"):  # the weights written beside it are plain tensors
        del config.quantization_config
    if dtype is not None:
        config.dtype = dtype
    for key, value in updates.items():
        setattr(config, key, value)
    config.save_pretrained(str(out))
    if (Path(source_dir) / GENERATION_CONFIG).is_file():
        GenerationConfig.from_pretrained(str(source_dir)).save_pretrained(str(out))


# ---------------------------------------------------------------- weights (safetensors)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding a folder's weights: the shards its index lists, or the one
    model file, or an adapter's weights (peft's, or a bottleneck-adapter checkpoint's)."""
    model_dir = Path(model_dir)
    index = model_dir / WEIGHTS_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in names]
    for name in (WEIGHTS, ADAPTER_WEIGHTS, BOTTLENECK_WEIGHTS):
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise ModelError(f"{model_dir}: no safetensors weights here ({WEIGHTS}, {WEIGHTS_INDEX} or {ADAPTER_WEIGHTS})")


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for every weight of a folder, one shard open at a time (memory: one tensor)."""
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield name, shard.get_tensor(name)


def tensor_names(model_dir: Path) -> dict[str, Path]:
    """{tensor name: the file that holds it} without reading any tensor."""
    found = {}
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt") as shard:
            found.update(dict.fromkeys(shard.keys(), file))
    return found


def load_tensors(model_dir: Path) -> dict[str, Any]:
    """Every weight of a folder in memory, shards joined."""
    return dict(iter_tensors(model_dir))


class Weights:
    """One model folder's tensors by name, each read from its shard only when asked (memory: the
    tensors asked for). `label` names the folder in messages (the key a user gave it under)."""

    def __init__(self, model_dir: Path, label: str | None = None):
        self.path = Path(model_dir)
        self.label = label or str(model_dir)
        self._shard_of: dict[str, Any] = {}
        for file in weight_files(self.path):
            shard = safe_open(str(file), framework="pt")
            self._shard_of.update(dict.fromkeys(shard.keys(), shard))  # noqa: SIM118
        self.names = list(self._shard_of)

    @cached_property
    def config(self) -> PretrainedConfig:
        return model_config(self.path)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shard_of[name].get_slice(name).get_shape())

    def meta(self, name: str) -> torch.Tensor:
        """The tensor's shape and dtype without its data (a meta tensor), read from the file header."""
        dtype = self._shard_of[name].get_slice(name).get_dtype()
        return torch.empty(self.shape(name), dtype=_SAFETENSORS_DTYPES[dtype], device="meta")

    def get(self, name: str) -> torch.Tensor:
        return self._shard_of[name].get_tensor(name)


def check_same_architecture(reference: Weights, other: Weights, layers_only: bool = False) -> None:
    """ModelError naming the first difference in model_type, tensor names or shapes (with
    `layers_only`, in model_type alone: the layer counts may differ)."""
    ref_type, other_type = reference.config.model_type, other.config.model_type
    if ref_type != other_type:
        raise ModelError(
            f"{other.label}: {other.path} is a {other_type} model, {reference.label} ({reference.path}) a "
            f"{ref_type}; only models of one architecture merge"
        )
    if layers_only:
        return
    missing = sorted(set(reference.names) ^ set(other.names))
    if missing:
        side = reference if missing[0] in reference.names else other
        raise ModelError(
            f"{other.label}: the architectures differ: {missing[0]} is only in {side.label} ({side.path}); "
            "only models of one architecture merge"
        )
    for name in reference.names:
        if reference.shape(name) != other.shape(name):
            raise ModelError(
                f"{other.label}: the architectures differ: {name} has shape {other.shape(name)} in {other.path} "
                f"but {reference.shape(name)} in {reference.path}"
            )


def save_sharded(
    layout: Mapping[str, torch.Tensor],
    out: Path,
    max_shard_size: int | str = "5GB",
    tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
) -> list[Path]:
    """Write safetensors shards into `out` as `save_pretrained` lays them out (`model.safetensors`, or
    `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`); returns the files written.

    huggingface_hub's `split_torch_state_dict_into_shards` plans the shards from `layout`, every
    tensor's name, shape and dtype in order (meta tensors will do). The tensors themselves come
    from `tensors` (default: `layout`'s own) and each shard is written once all its tensors have
    come: fed in layout order, memory holds one shard being filled.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(dict(layout), max_shard_size=max_shard_size)
    pending: dict[str, dict[str, torch.Tensor]] = {filename: {} for filename in split.filename_to_tensors}
    written = []
    for name, tensor in layout.items() if tensors is None else tensors:
        filename = split.tensor_to_filename[name]
        shard = pending[filename]
        shard[name] = tensor.contiguous()
        if len(shard) == len(split.filename_to_tensors[filename]):
            save_file(pending.pop(filename), str(out / filename), metadata={"format": "pt"})
            written.append(out / filename)
    missing = [
        name for filename, shard in pending.items() for name in split.filename_to_tensors[filename] if name not in shard
    ]
    if missing:
        raise ValueError(f"save_sharded: {len(missing)} tensors of the layout never came ({missing[0]}, ...)")
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(written)


def _enum_value(value: Any) -> str:
    """peft's enums (PeftType, TaskType) are str enums whose format() is `PeftType.LORA`: the value."""
    return str(getattr(value, "value", value))
