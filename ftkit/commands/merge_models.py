"""`ftkit merge --config merge.yaml --out DIR`: merge whole models, or combine LoRA adapters.

A merge config is data, validated like a recipe (unknown keys, wrong types and broken
rules are reported all at once as `merge.yaml:LINE: key: problem`):

    method: ties                 # see below
    base: runs/base-model        # the model the others were fine-tuned from (task methods)
    models:
      - {model: runs/math, weight: 0.6}
      - {model: runs/code, weight: 0.4}
    density: 0.5                 # ties / dare: fraction of each task vector kept
    dtype: float32

Methods, per tensor θ (float32 maths, written in `dtype`), τ_i = θ_i − θ_base, w_i the weights:

    linear           Σ w_i θ_i / Σ w_i   (`normalize: false` drops the division)
    task_arithmetic  θ_base + Σ w_i τ_i                      (Ilharco et al. 2023)
    ties             θ_base + disjoint mean of the top-`density` magnitudes of w_i τ_i that agree
                     with the elected sign (Yadav et al. 2023; peft.utils.merge_utils.ties)
    dare_linear      θ_base + Σ w_i m_i ⊙ τ_i / density, m_i ~ Bernoulli(density), seeded (Yu et al. 2024)
    dare_ties        DARE's random drop and rescale, then TIES' sign election and disjoint mean
    slerp            spherical interpolation of exactly two models at `t` (0 = the first):
                     θ = sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1, Ω the angle between them;
                     linear interpolation when they are (anti)parallel
    passthrough      stack decoder layers: `slices: [{model, layers: [start, end]}]` (end excluded);
                     embeddings, final norm and head come from `base` or the first slice's model
    adapters         combine LoRA adapters into one with peft's `add_weighted_adapter`
                     (`combination`: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties,
                     dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd)

Models are run directories (their final/), model directories, all with safetensors
weights; they must share an architecture (same model_type, tensor names and shapes)
or the merge stops naming the first difference. Tensors are read and written one at a
time, so memory stays at one tensor per input plus one output shard.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from peft.utils import merge_utils
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from transformers import AutoTokenizer

from ftkit.commands.merge import REPORT_FILE
from ftkit.commands.merge_moe import MoeConfig, moe_rule_problems, run_moe
from ftkit.errors import FtkitError, ModelError, RecipeError
from ftkit.io import check_out, publish
from ftkit.models import bottleneck, hf_files
from ftkit.models.hf_files import Weights, check_same_architecture
from ftkit.models.target import load_model, load_tokenizer, resolve_target, same_model
from ftkit.recipe.diagnostics import problems_from_validation
from ftkit.recipe.sources import Problem, SourceMap, describe_value, format_path
from ftkit.recipe.yaml_loader import YamlError, dump_yaml, load_yaml

TENSOR_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp")
TASK_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear")
#: |cos Ω| above this and the two tensors are (anti)parallel: slerp's sin Ω → 0, so interpolate linearly
SLERP_PARALLEL = 0.9995
CONFIG_FILE = "merge_config.yaml"
_LAYER_KEY = re.compile(r"^(.*\.layers)\.(\d+)\.(.+)$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Section):
    """One input model and its weight."""

    model: str = Field(..., description="Run directory, model directory or adapter directory (method adapters).")
    weight: float = Field(1.0, description="Weight w_i of this model (or its task vector).")


class LayerSlice(_Section):
    """A run of decoder layers taken from one model (passthrough)."""

    model: str = Field(..., description="Run or model directory the layers come from.")
    layers: tuple[int, int] = Field(..., description="[start, end): decoder layers start .. end-1.")


class MergeConfig(_Section):
    """A model merge or an adapter combination."""

    method: Literal[
        "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "passthrough", "adapters", "moe"
    ] = Field(..., description="How the models are merged (moe: ftkit.commands.merge_moe's own config).")
    models: list[ModelEntry] = Field(default_factory=list, description="Input models with weights.")
    base: str | None = Field(None, description="The common base model (task methods; the base of adapters).")
    density: float = Field(1.0, gt=0.0, le=1.0, description="ties / dare / magnitude_prune: fraction kept.")
    majority_sign: Literal["total", "frequency"] = Field(
        "total", description="ties: elect each sign by summed values (total) or by counts (frequency)."
    )
    normalize: bool = Field(True, description="linear: divide by the sum of the weights.")
    t: float = Field(0.5, ge=0.0, le=1.0, description="slerp: 0 gives the first model, 1 the second.")
    slices: list[LayerSlice] = Field(default_factory=list, description="passthrough: the layer slices, in order.")
    seed: int = Field(0, description="dare: seed of the random drop.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype of the merged weights.")
    combination: Literal[
        "linear",
        "cat",
        "svd",
        "ties",
        "ties_svd",
        "dare_linear",
        "dare_ties",
        "dare_linear_svd",
        "dare_ties_svd",
        "magnitude_prune",
        "magnitude_prune_svd",
    ] = Field("cat", description="adapters: peft add_weighted_adapter combination_type.")
    svd_rank: int | None = Field(None, ge=1, description="adapters, *_svd: rank of the result (default: the largest).")
    max_shard_size: int = Field(2 * 1024**3, ge=1, description="Largest output shard in bytes.")


# ---------------------------------------------------------------- loading and rules


def load_merge_config(path: str | Path) -> Any:
    """Read and validate a merge config; RecipeError listing every problem as `file:line: key: problem`."""
    source = str(path)
    try:
        loaded = load_yaml(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError([f"{source}: cannot read the merge config: {err}"]) from None
    except YamlError as err:
        raise RecipeError([f"{source}:{err.line}: {err.message}"]) from None
    sources = SourceMap(source, loaded.root_line, loaded.lines, loaded.tokens)
    problems = [
        Problem(
            f"{source}:{d.line}",
            format_path(d.path),
            f"duplicate key: given at line {d.first_line} and again at line {d.line}; keep one",
            (0, d.line),
        )
        for d in loaded.duplicates
    ]
    data = {} if loaded.data is None else loaded.data
    config = None
    schema, rules = MergeConfig, rule_problems
    if isinstance(data, dict) and data.get("method") == "moe":  # mixture of experts: its own keys
        schema, rules = MoeConfig, moe_rule_problems
    if not isinstance(data, dict):
        problems.append(
            sources.problem((), f"a merge config is a mapping (method, models, ...); got {describe_value(data)}")
        )
    else:
        try:
            config = schema.model_validate(data)
        except ValidationError as err:
            problems += problems_from_validation(err, schema, sources)
    if config is not None:
        problems += [sources.problem(path, message) for path, message in rules(config)]
    if problems or config is None:
        ordered = sorted(problems, key=lambda p: p.order)
        raise RecipeError(list(dict.fromkeys(str(p) for p in ordered)))
    return config


def rule_problems(config: MergeConfig) -> list[tuple[tuple, str]]:
    """Every rule between keys that the config breaks, as (key path, message)."""
    method, n = config.method, len(config.models)
    problems = []
    if method == "passthrough":
        if not config.slices:
            problems.append((("slices",), "passthrough needs slices: [{model, layers: [start, end]}, ...]"))
        if config.models:
            problems.append((("models",), "passthrough takes its layers from slices; remove models"))
        for i, piece in enumerate(config.slices):
            start, end = piece.layers
            if not 0 <= start < end:
                problems.append(
                    (("slices", i, "layers"), f"[{start}, {end}] is empty; write [start, end] with start < end")
                )
    else:
        if config.slices:
            problems.append((("slices",), f"slices are for passthrough, not {method}; remove them"))
        if n == 0:
            problems.append((("method",), f"{method} needs models: [{{model: DIR, weight: W}}, ...]"))
    if method == "slerp" and n != 2:
        problems.append((("models",), f"slerp merges exactly two models; got {n}"))
    if method in TASK_METHODS and config.base is None:
        problems.append(
            (("method",), f"{method} merges task vectors θ_i − θ_base; give base: the model they started from")
        )
    if method in ("linear", "slerp") and config.base is not None:
        problems.append((("base",), f"{method} does not use a base model; remove it"))
    if method == "linear" and config.normalize and n and math.isclose(sum(m.weight for m in config.models), 0.0):
        problems.append((("models",), "linear with normalize divides by the sum of weights, which is 0"))
    return problems


# ---------------------------------------------------------------- tensor maths


def merge_tensors(config: MergeConfig, tensors: list[Any], base: Any | None = None) -> Any:
    """One merged tensor from the inputs' tensors (same shape), by `config.method`; float32 maths.

    See the module docstring for each formula. Non-floating tensors (integer buffers) are taken
    from the base, or the first model, unchanged.
    """
    first = tensors[0]
    if not first.is_floating_point():
        return (base if base is not None else first).clone()
    xs = [t.to(torch.float32) for t in tensors]
    weights = torch.tensor([m.weight for m in config.models], dtype=torch.float32)
    method = config.method
    if method == "linear":
        merged = merge_utils.task_arithmetic(xs, weights)
        return merged / weights.sum() if config.normalize else merged
    if method == "slerp":
        return slerp(config.t, xs[0], xs[1])
    b = base.to(torch.float32)
    deltas = [x - b for x in xs]
    if method == "task_arithmetic":
        return b + merge_utils.task_arithmetic(deltas, weights)
    if method == "ties":
        return b + merge_utils.ties(deltas, weights, config.density, config.majority_sign)
    if method == "dare_linear":
        return b + merge_utils.dare_linear(deltas, weights, config.density)
    if method == "dare_ties":
        return b + merge_utils.dare_ties(deltas, weights, config.density, config.majority_sign)
    raise ValueError(f"merge_tensors does not do {method}")


def slerp(t: float, v0: Any, v1: Any) -> Any:
    """Spherical interpolation between two tensors treated as flat vectors (formula in the module docstring)."""
    a, b = v0.flatten(), v1.flatten()
    norm_a, norm_b = a.norm(), b.norm()
    if norm_a == 0 or norm_b == 0:
        return (1 - t) * v0 + t * v1
    cos = torch.clamp(torch.dot(a / norm_a, b / norm_b), -1.0, 1.0)
    if abs(float(cos)) > SLERP_PARALLEL:
        return (1 - t) * v0 + t * v1
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / sin) * v0 + (torch.sin(t * omega) / sin) * v1


# ---------------------------------------------------------------- model merges


def run_merge_config(config: Any, out: str | Path, overwrite: bool = False) -> dict:
    """Merge as `config` says into `out` (staged, then renamed); return {"summary": ...}."""
    if config.method == "moe":
        return run_moe(config, out, overwrite)
    out = Path(out)
    inputs = [m.model for m in config.models] + [s.model for s in config.slices] + [config.base]
    check_out(out, overwrite, [("input", path) for path in inputs])
    started = time.perf_counter()
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if config.method == "adapters":
            summary = combine_adapters(config, staging)
        elif config.method == "passthrough":
            summary = passthrough(config, staging)
        else:
            summary = merge_models(config, staging)
        (staging / CONFIG_FILE).write_text(dump_yaml(config.model_dump(mode="json")))
        summary |= {"method": config.method, "out": str(out), "wall_s": time.perf_counter() - started}
        (staging / REPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"summary": summary}


def model_dir(spec: str, key: str) -> Path:
    """The weights directory of a model input: a run's final/ or a model directory; never an adapter."""
    try:
        target = resolve_target(spec)
    except FtkitError as err:
        raise ModelError(f"{key}: {err}") from None
    if target.bottleneck:
        raise ModelError(f"{key}: {spec}: {bottleneck.NOT_MERGEABLE}")
    if target.is_adapter:
        raise ModelError(
            f"{key}: {spec} is an adapter; merge it into its base first (ftkit merge {spec} --out DIR), "
            "or combine adapters with method: adapters"
        )
    path = Path(target.weights)
    if not path.is_dir() or not hf_files.has_weights(path):
        raise ModelError(f"{key}: {spec} has no safetensors weights here; give a local model or run directory")
    return path


def open_model(spec: str, key: str, label: str) -> Weights:
    """A model input's weights (read lazily), named `label` in messages."""
    return Weights(model_dir(spec, key), label)


def merge_models(config: MergeConfig, out: Path) -> dict:
    """Tensor-wise merge of whole models (linear, task_arithmetic, ties, dare_*, slerp)."""
    models = [open_model(m.model, f"models[{i}].model", f"models[{i}]") for i, m in enumerate(config.models)]
    base = open_model(config.base, "base", "base") if config.base else None
    reference = base or models[0]
    for other in models:
        if other is not reference:
            check_same_architecture(reference, other)
    dtype = getattr(torch, config.dtype)
    non_finite = []

    def merged() -> Iterator[tuple[str, Any]]:
        for name in reference.names:
            tensor = merge_tensors(config, [m.get(name) for m in models], base.get(name) if base else None)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                non_finite.append(name)
            yield name, _cast(tensor, dtype)

    layout = {name: _cast(reference.meta(name), dtype) for name in reference.names}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # dare's Bernoulli masks, drawn tensor by tensor in file order
        files = hf_files.save_sharded(layout, out, config.max_shard_size, tensors=merged())
    if non_finite:
        raise FtkitError(
            f"the merge produced NaN/inf in {non_finite[0]} ({len(non_finite)} tensors); check the weights"
        )
    hf_files.copy_model_config(reference.path, out, config.dtype)
    _copy_tokenizer(reference.path, out)
    return {"models": [str(m.path) for m in models], "base": str(base.path) if base else None,
            "tensors": len(reference.names), "files": [f.name for f in files]}  # fmt: skip


def passthrough(config: MergeConfig, out: Path) -> dict:
    """Stack the layer slices into one deeper (or shallower) model; the rest comes from `base` or slice 0."""
    pieces = [open_model(s.model, f"slices[{i}].model", f"slices[{i}]") for i, s in enumerate(config.slices)]
    frame = open_model(config.base, "base", "base") if config.base else pieces[0]
    for piece in pieces:
        if piece is not frame:
            check_same_architecture(frame, piece, layers_only=True)
    # (output name, source model, source name): the frame's non-layer tensors, then each slice's layers
    sources = [(name, frame, name) for name in frame.names if not _LAYER_KEY.match(name)]
    index, layer_types = 0, []
    for i, (spec, piece) in enumerate(zip(config.slices, pieces, strict=True)):
        start, end = spec.layers
        n_layers = int(getattr(piece.config, "num_hidden_layers", 0) or 0)
        if end > n_layers:
            raise ModelError(f"slices[{i}].layers: [{start}, {end}] goes past the {n_layers} layers of {piece.path}")
        types = getattr(piece.config, "layer_types", None)
        for layer in range(start, end):
            prefix_names = [(m, n) for n in piece.names if (m := _LAYER_KEY.match(n)) and int(m.group(2)) == layer]
            for match, name in prefix_names:
                sources.append((f"{match.group(1)}.{index}.{match.group(3)}", piece, name))
            if isinstance(types, list):
                layer_types.append(types[layer])
            index += 1
    dtype = getattr(torch, config.dtype)
    layout = {out_name: _cast(model.meta(name), dtype) for out_name, model, name in sources}
    tensors = ((out_name, _cast(model.get(name), dtype)) for out_name, model, name in sources)
    files = hf_files.save_sharded(layout, out, config.max_shard_size, tensors=tensors)
    updates: dict[str, Any] = {"num_hidden_layers": index}
    if layer_types:
        updates["layer_types"] = layer_types
    hf_files.copy_model_config(frame.path, out, config.dtype, **updates)
    _copy_tokenizer(frame.path, out)
    return {"slices": [[str(p.path), *s.layers] for p, s in zip(pieces, config.slices, strict=True)],
            "num_hidden_layers": index, "files": [f.name for f in files]}  # fmt: skip


def _cast(tensor: Any, dtype: Any) -> Any:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _copy_tokenizer(source: Path, out: Path) -> None:
    """The tokenizer of the source model, saved as transformers writes it (when the source has one)."""
    if hf_files.has_tokenizer(source):
        AutoTokenizer.from_pretrained(source).save_pretrained(out)


# ---------------------------------------------------------------- adapters


def combine_adapters(config: MergeConfig, out: Path) -> dict:
    """Combine LoRA adapters with peft's add_weighted_adapter into one adapter saved in `out`.

    The adapters must sit on one base: their recorded bases must agree, or `base:` names it.
    The result is checked: loaded back with PeftModel.from_pretrained, its logits equal those
    of the combined adapter in memory (max |Δ| ≤ 1e-5 in float32).
    """
    targets = []
    for i, entry in enumerate(config.models):
        target = resolve_target(entry.model, base=config.base)
        if not target.is_adapter:
            raise ModelError(f"models[{i}].model: {entry.model} is not an adapter; method adapters combines adapters")
        if target.bottleneck:
            raise ModelError(f"models[{i}].model: {entry.model}: {bottleneck.NOT_MERGEABLE}")
        targets.append(target)
    if config.base is None:
        for i, target in enumerate(targets[1:], start=1):
            if not same_model(target.base, targets[0].base):
                raise ModelError(
                    f"models[{i}].model: its base is {target.base}, models[0]'s is {targets[0].base}; "
                    "adapters combine only on one base (give base: to choose it)"
                )
    first = targets[0]
    tokenizer = load_tokenizer(first)
    model = load_model(first, tokenizer, dtype=config.dtype, quantized=False, base_only=True)
    names = [f"input_{i}" for i in range(len(targets))]
    model = PeftModel.from_pretrained(model, first.weights, adapter_name=names[0])
    for name, target in zip(names[1:], targets[1:], strict=True):
        model.load_adapter(target.weights, adapter_name=name)
    try:
        model.add_weighted_adapter(
            adapters=names,
            weights=[m.weight for m in config.models],
            adapter_name="default",  # saved at the top of `out`, where PeftModel.from_pretrained looks
            combination_type=config.combination,
            svd_rank=config.svd_rank,
            density=config.density if config.combination not in ("linear", "cat", "svd") else None,
            majority_sign_method=config.majority_sign,
        )
    except ValueError as err:  # peft's own checks: ranks differ for linear, shared modules_to_save ...
        raise ModelError(f"combination: {config.combination}: {err}") from None
    for name in names:
        model.delete_adapter(name)
    model.set_adapter("default")
    model.eval()
    probe = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=probe).logits
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    hf_files.point_adapter_to(out, first.base)
    reloaded = PeftModel.from_pretrained(model.unload(), out).eval()
    with torch.no_grad():
        diff = float((reloaded(input_ids=probe).logits - expected).abs().max())
    if diff > 1e-5:
        raise FtkitError(
            f"the combined adapter does not load back as computed (max |Δ logit| {diff:.2e}); nothing written"
        )
    return {"adapters": [t.weights for t in targets], "base": first.base, "combination": config.combination,
            "r": getattr(hf_files.adapter_config(out), "r", None), "reload_max_abs_logit_diff": diff}  # fmt: skip
