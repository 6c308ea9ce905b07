"""Bottleneck adapters (`method.name: adapter`) and AdapterFusion (`method.name: adapter_fusion`).

The modules and their placement are in `ftkit.models.bottleneck` (eval and generate load them
back from there); this file marks what trains and checks what a run needs:

    adapter          fresh bottlenecks after attention and MLP (houlsby) or after the MLP (pfeiffer);
                     the base frozen; the adapters and any `modules_to_save` train.
    adapter_fusion   the bottlenecks of N finished `adapter` runs on the same base, frozen, and a
                     fusion attention over them at every site; only the fusion layers train. The
                     run's summary.json and report.md say how the fusion weighs each adapter on the
                     validation set (the mean softmax weight per adapter over val tokens and sites).

Saving: the model's `save_pretrained` is replaced, on this one model object, by a writer of the
trained tensors only (`ftkit.models.bottleneck.save`), so checkpoints and final/ hold the adapters
(a few MB), not a copy of the base: final/ is bottleneck_model.safetensors + bottleneck_config.json.
Bottleneck adapters are not linear in the base weights, so nothing can be merged into the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ftkit.data.splits import sequences
from ftkit.errors import FtkitError, ModelError
from ftkit.methods.adapters import CLASSIFIER_HEADS, is_classifier
from ftkit.methods.base import MethodHooks, RunInfo
from ftkit.models import bottleneck as bn
from ftkit.models import hf_files
from ftkit.models.target import resolve_target, same_model
from ftkit.recipe.methods import AdapterConfig, AdapterFusionConfig

# ---------------------------------------------------------------- adapter


def adapter_record(config: AdapterConfig) -> dict:
    """What bottleneck_config.json records of an adapter run's method section."""
    return {
        "method": "adapter",
        "config": config.config,
        "reduction_factor": config.reduction_factor,
        "non_linearity": config.non_linearity,
        "modules_to_save": list(config.modules_to_save or []),
    }


def run_problems(config: AdapterConfig | AdapterFusionConfig, skeleton: Any, run: RunInfo) -> list[str]:
    """A layout without model.layers[i].self_attn / .mlp; modules_to_save the model lacks; for fusion,
    adapter runs that are not there, not bottleneck runs, or trained on another base."""
    if isinstance(config, AdapterFusionConfig):
        problems, records = fusion_inputs(config)
        if records:
            sites = tuple(s for s in ("self_attn", "mlp") if any(s in bn.SITES[r["config"]] for r in records))
            problem = bn.layout_problem(skeleton, sites, config.name)
            problems += [problem] if problem else []
        if records and not problems:
            problems += _shape_problems(config, records[0]["base"], skeleton)
        return problems
    problem = bn.layout_problem(skeleton, bn.SITES[config.config], config.name)
    problems = [problem] if problem else []
    leaves = {name.rsplit(".", 1)[-1] for name, _ in skeleton.named_modules()}
    missing = [m for m in config.modules_to_save or [] if m not in leaves]
    if missing:
        problems.append(f"method.modules_to_save: {', '.join(missing)} not among the model's modules")
    return problems


def apply(model: Any, config: AdapterConfig | AdapterFusionConfig, run: RunInfo) -> Any:
    if isinstance(config, AdapterFusionConfig):
        return apply_fusion(model, config)
    record = adapter_record(config)
    if is_classifier(model):  # a classifier's new head trains and is saved, as peft's SEQ_CLS does
        heads = [head for head in CLASSIFIER_HEADS if hasattr(model, head) and head not in record["modules_to_save"]]
        record["modules_to_save"] += heads
    model.requires_grad_(False)
    bn.add_adapters(model, record)
    for site in bn.adapter_modules(model):
        site.requires_grad_(True)
    saved = set(record["modules_to_save"])
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in saved:
            module.requires_grad_(True)
    _save_trained_only(model, record)
    return model


def _save_trained_only(model: Any, record: dict) -> None:
    """`model.save_pretrained(dir, ...)` writes the trained tensors only (see the module docstring)."""

    def save_pretrained(out_dir: Any, *args: Any, **kwargs: Any) -> None:
        bn.save(model, Path(out_dir), record)

    model.save_pretrained = save_pretrained
    model.saves_trained_weights_only = True  # what ftkit.train.checkpoint sizes a checkpoint by


# ---------------------------------------------------------------- adapter_fusion


def fusion_inputs(config: AdapterFusionConfig) -> tuple[list[str], list[dict]]:
    """(problems, the adapter runs' bottleneck configs with their final/ paths and bases)."""
    problems, records = [], []
    for i, spec in enumerate(config.adapters):
        key = f"method.adapters[{i}]"
        path = Path(spec).expanduser()
        if not path.exists():
            problems.append(f"{key}: {spec} does not exist; give the run directory of a finished adapter run")
            continue
        try:
            target = resolve_target(path)
        except FtkitError as err:
            problems.append(f"{key}: {err}")
            continue
        if not target.bottleneck:
            method = target.recipe.method.name if target.recipe is not None else "not a run"
            problems.append(
                f"{key}: {spec} is not a bottleneck-adapter run (method {method}); adapter_fusion combines runs of "
                "method.name: adapter"
            )
            continue
        record = bn.read_config(Path(target.weights))
        if record["method"] != "adapter":
            problems.append(f"{key}: {spec} is an adapter_fusion run; list the adapter runs it fused instead")
            continue
        if record.get("modules_to_save"):
            problems.append(
                f"{key}: {spec} also trained {', '.join(record['modules_to_save'])} in full (modules_to_save), "
                "which cannot be fused; fuse adapter runs without modules_to_save"
            )
            continue
        records.append({**record, "path": str(Path(target.weights).resolve()), "base": target.base})
    if len(records) > 1 and not problems:
        first = records[0]["base"]
        for i, record in enumerate(records[1:], start=1):
            if not same_model(record["base"], first) and not _same_weights(record["base"], first):
                problems.append(
                    f"method.adapters[{i}]: {config.adapters[i]} was trained on {record['base']}, "
                    f"method.adapters[0] on {first}; fuse adapters trained on the same base"
                )
    return problems, records


#: config keys that must agree between the fused adapters' base and this run's model
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


def _shape_problems(config: AdapterFusionConfig, base: str, skeleton: Any) -> list[str]:
    """The adapters' base and this run's model differ in shape (before any weight loads)."""
    try:
        theirs = hf_files.model_config(Path(base)).to_dict()
    except (FtkitError, OSError, ValueError):
        return []  # a base that is not a local folder: apply_fusion compares what it can
    ours = skeleton.config.to_dict()
    for key in SHAPE_KEYS:
        if theirs.get(key) != ours.get(key):
            return [
                f"method.adapters[0]: {config.adapters[0]} was trained on {base} ({key} {theirs.get(key)}), this "
                f"run's model has {key} {ours.get(key)}; set model.name to the base the adapters were trained on"
            ]
    return []


def _same_weights(a: str, b: str) -> bool:
    """Two built-in bases written into different runs' base/ folders are the same model when their
    config and weight files are byte-identical."""
    pa, pb = Path(a), Path(b)
    if not (pa.is_dir() and pb.is_dir()):
        return False
    names = sorted(p.name for p in pa.iterdir() if p.suffix in {".json", ".safetensors"} and "token" not in p.name)
    return bool(names) and all((pb / n).is_file() and (pa / n).read_bytes() == (pb / n).read_bytes() for n in names)


def fused_record(records: list[dict]) -> dict:
    return {
        "method": "adapter_fusion",
        "adapters": [{k: r[k] for k in ("config", "reduction_factor", "non_linearity", "path")} for r in records],
    }


def apply_fusion(model: Any, config: AdapterFusionConfig) -> Any:
    problems, records = fusion_inputs(config)
    if problems:
        raise ModelError(problems[0])
    base, ours = records[0]["base"], str(getattr(model, "name_or_path", "") or "")
    if Path(ours).is_dir() and not (same_model(ours, base) or _same_weights(ours, base)):
        raise ModelError(
            f"method.adapters[0]: {config.adapters[0]} was trained on {base}, not on this run's model {ours}; "
            "set model.name to the base the adapters were trained on"
        )
    record = fused_record(records)
    bn.add_fusion(model, record["adapters"])
    model.requires_grad_(False)  # the base and the adapters it fuses
    state = {}
    for i, entry in enumerate(records):
        for name, tensor in bn.load_file(str(Path(entry["path"]) / bn.BOTTLENECK_WEIGHTS)).items():
            head, _, tail = name.partition(f".{bn.ADAPTER}.")
            state[f"{head}.{bn.FUSION}.adapters.{i}.{tail}"] = tensor
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ModelError(f"method.adapters: tensors this base does not have: {', '.join(result.unexpected_keys[:3])}")
    for fusion in bn.fusions(model):
        fusion.requires_grad_(True)
    _save_trained_only(model, record)
    return model


def fusion_weights(model: Any, examples: list, run: RunInfo) -> dict[str, float]:
    """The fusion's mean softmax weight per adapter over every token of `examples` (batches of the
    task's scoring objective, `run.objective`) and every site."""
    fusions = bn.fusions(model)
    for fusion in fusions:
        fusion.weight_sum.zero_()
        fusion.tokens.zero_()
        fusion.record = True
    was_training = model.training
    model.eval()
    batch_size = run.train.batch_size if run.train is not None else 8
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = run.objective.collate(examples[start : start + batch_size], run.pad_id or 0)
                run.objective.loss_sum(model, {k: v.to(run.device or "cpu") for k, v in batch.items()})
    finally:
        for fusion in fusions:
            fusion.record = False
        model.train(was_training)
    total = sum(f.weight_sum for f in fusions)
    tokens = sum(float(f.tokens) for f in fusions)
    return {str(i): float(total[i]) / max(tokens, 1.0) for i in range(len(total))}


def hooks(model: Any, config: AdapterConfig | AdapterFusionConfig, run: RunInfo) -> MethodHooks:
    if not isinstance(config, AdapterFusionConfig):
        return MethodHooks()

    def facts() -> dict:
        examples = sequences(list(run.val_examples) or list(run.examples))  # both answers of preference pairs
        split = "val" if run.val_examples else "train"
        weights = fusion_weights(model, examples, run)
        return {
            "fusion_weights": {config.adapters[int(i)]: round(w, 4) for i, w in weights.items()},
            "fusion_weights_split": split,
        }

    return MethodHooks(facts=facts)
