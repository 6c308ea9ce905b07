"""The one reader and writer of Hugging Face and peft files in a model or adapter folder.

Configs go through the libraries that own them (`peft.PeftConfig`, `transformers.AutoConfig`,
`GenerationConfig`), never through hand-written JSON, so a field peft or transformers adds
or renames is handled by them. Weights are safetensors only: one file or an index of shards.

    adapter folder   adapter_config.json + adapter_model.safetensors (peft's layout)
    model folder     config.json (+ generation_config.json) + model.safetensors or shards
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub import split_torch_state_dict_into_shards
from peft import PeftConfig
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from ftkit.errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


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


def adapter_config(adapter_dir: Path) -> PeftConfig:
    """The adapter's peft config (the concrete class for its peft type: LoraConfig, ...)."""
    try:
        return PeftConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"{adapter_dir}/{ADAPTER_CONFIG}: cannot read it ({err})") from None


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model an adapter records (`base_model_name_or_path`), or None when it records none."""
    return adapter_config(adapter_dir).base_model_name_or_path or None


def adapter_task_type(adapter_dir: Path) -> str | None:
    """peft's task type of an adapter: CAUSAL_LM, SEQ_CLS, ... (None when it records none)."""
    task = adapter_config(adapter_dir).task_type
    return str(getattr(task, "value", task)) if task is not None else None


def adapter_rank(adapter_dir: Path) -> int:
    """The largest LoRA rank in an adapter (its `r`, or the largest of its rank pattern)."""
    config = adapter_config(adapter_dir)
    ranks = [
        int(getattr(config, "r", 0) or 0),
        *(int(r) for r in (getattr(config, "rank_pattern", None) or {}).values()),
    ]
    return max(ranks)


def point_adapter_to(adapter_dir: Path, base: str) -> None:
    """Record `base` as the adapter's base model, so `PeftModel.from_pretrained` needs no guess."""
    config = adapter_config(adapter_dir)
    config.base_model_name_or_path = base
    config.save_pretrained(str(adapter_dir))


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
    """The model classes config.json names (`LlamaForCausalLM`, ...); empty when it names none."""
    return list(raw_model_config(model_dir).get("architectures") or [])


def is_classifier_architecture(names: list[str]) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in names)


def config_labels(model_dir: Path) -> list[str] | None:
    """The class names (id order) a config.json records in id2label; None when it records none
    (transformers fills `LABEL_0, LABEL_1` for a model that has no labels: those are not labels)."""
    id2label = raw_model_config(model_dir).get("id2label") or {}
    if not id2label or not (Path(model_dir) / MODEL_CONFIG).is_file():
        return None
    return [id2label[key] for key in sorted(id2label, key=int)]


def copy_model_config(source_dir: Path, out: Path, dtype: str | None = None, **updates: Any) -> None:
    """config.json of `source_dir` with the new dtype (and `updates`), and its generation config, into `out`."""
    config = model_config(source_dir)
    if dtype is not None:
        config.dtype = dtype
    for key, value in updates.items():
        setattr(config, key, value)
    config.save_pretrained(str(out))
    if (Path(source_dir) / GENERATION_CONFIG).is_file():
        GenerationConfig.from_pretrained(str(source_dir)).save_pretrained(str(out))


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding a model's weights: the shards an index lists, or the one file."""
    model_dir = Path(model_dir)
    index = model_dir / WEIGHTS_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in names]
    single = model_dir / WEIGHTS
    if single.is_file():
        return [single]
    adapter = model_dir / ADAPTER_WEIGHTS
    if adapter.is_file():
        return [adapter]
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


def save_sharded(state_dict: dict[str, Any], out: Path, max_shard_size: int | str = "5GB") -> list[Path]:
    """Write `state_dict` as safetensors shards (+ index when more than one), as `save_pretrained` lays them
    out; the split is huggingface_hub's `split_torch_state_dict_into_shards`. Returns the files written."""
    out = Path(out)
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    written = []
    for filename, names in split.filename_to_tensors.items():
        save_file(
            {name: state_dict[name].contiguous() for name in names}, str(out / filename), metadata={"format": "pt"}
        )
        written.append(out / filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written
