"""LoRA-drop (Zhou et al. 2024, "LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation").

LoRA, h = W x + s · B A x, on every target module; then, before the run trains:

1. Scoring run: LoRA trains `sample_steps` optimizer steps (train.optimizer at a constant train.lr,
   train.batch_size) on a random `sample_fraction` of the training examples (seeded by train.seed).
2. Importance of decoder layer i (all its adapted modules m), over the sample's T real tokens x_t:

       g_i = (1/T) Σ_t Σ_m ‖ΔW_{i,m} x_{i,m,t}‖²,   ΔW = s · B A,   ĝ_i = g_i / Σ_j g_j

   measured with the scored adapters in eval mode (no dropout), padding excluded. With preference
   data (DPO, IPO, ORPO, SimPO) the scoring run is SFT on the chosen answers of the sampled pairs.
3. Layers sorted by ĝ descending; the shortest prefix whose cumulative ĝ reaches `threshold`
   keeps its own LoRA. The other layers share one LoRA per module type (every `layers.*.q_proj` of
   them the same A and B: one nn.Parameter, trained by the sum of their gradients).
4. Every adapter goes back to its initial value (the init a plain LoRA run with this seed starts
   from; shared ones take the first shared layer's) and the run trains as usual.

The choice and the importances are written to `lora_drop.json` in the run directory and summed up
in one line on stderr. A resumed run rebuilds the same sharing from that file, without scoring
again. A module outside any numbered layer (none with `all-linear` on a decoder) is a layer of its
own. Trainable parameters count each shared tensor once (`named_parameters` deduplicates them, as
peft's `get_nb_trainable_parameters` does). Checkpoints and `final/` go through peft's
`save_pretrained`, which writes a copy of a shared tensor for each layer (safetensors refuses
aliases): `final/` is a plain LoRA that `PeftModel.from_pretrained` loads and merges, and resuming
loads the same value into every alias.

Applied without training examples (`ftkit plan`, meta-device parameter counts) no layer can be
scored: every layer keeps its own LoRA, the upper bound of what trains.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer

from ftkit.errors import ModelError
from ftkit.io import messages
from ftkit.methods import lora
from ftkit.methods.base import RunInfo
from ftkit.recipe.methods import LoraDropConfig
from ftkit.recipe.schema import TrainSection

ADAPTER = "default"
RECORD = "lora_drop.json"
_LAYER = re.compile(r"^(.*?\.\d+)(\..*)$")  # "model.layers.3" + ".self_attn.q_proj"


run_problems = lora.run_problems  # the same adapters: the same targets and init checks


def apply(model: Any, config: LoraDropConfig, run: RunInfo) -> Any:
    model = lora.apply(model, config, run)
    layers = _layer_modules(model)
    if run.resume_from is not None:
        kept = _read_choice(run.run_dir, layers)
    elif run.examples:
        importance = score_layers(model, config, run)
        kept = choose_layers(importance, config.threshold)
        record = {
            "threshold": config.threshold,
            "sample_examples": _sample_size(len(run.examples), config.sample_fraction),
            "sample_steps": config.sample_steps,
            "layers": [{"layer": name, "importance": importance[name], "kept": name in kept} for name in layers],
            "kept": [name for name in layers if name in kept],
            "shared": [name for name in layers if name not in kept],
        }
        if run.run_dir is not None:
            _write_json(Path(run.run_dir) / RECORD, record)
        print(_summary(record), file=messages(), flush=True)
    else:
        return model
    share_adapters(layers, kept)
    return model


def _layer_modules(model: Any) -> dict[str, dict[str, Any]]:
    """{layer name: {module path inside the layer: peft LoRA layer}}, layers in model order.

    The layer is the module path up to its first numeric part (`model.layers.3`); the part after
    it (`.self_attn.q_proj`) says which modules of different layers have one shape and may share."""
    layers: dict[str, dict[str, Any]] = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            if not isinstance(module.lora_A[ADAPTER], torch.nn.Linear):
                raise ModelError(f"method.target_modules: lora_drop adapts linear layers only; {name} is not one")
            match = _LAYER.match(name)
            layer, slot = (match.group(1), match.group(2)) if match else (name, "")
            layers.setdefault(layer, {})[slot] = module
    if not layers:
        raise ModelError("method.target_modules: lora_drop found no LoRA layer to score")
    return layers


def _sample_size(n_examples: int, fraction: float) -> int:
    return max(1, round(n_examples * fraction))


def score_layers(model: Any, config: LoraDropConfig, run: RunInfo) -> dict[str, float]:
    """Train the LoRA briefly on a sample, return ĝ per layer (sums to 1), then put every adapter
    back to its initial value."""

    if run.pad_id is None or run.objective is None or run.build_optimizer is None:
        raise ModelError(
            "method.name: lora_drop scores layers with a short run: it needs RunInfo's pad_id, "
            "objective and build_optimizer"
        )
    train = run.train or TrainSection(lr=config.default_lr)
    layers = _layer_modules(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in trainable]
    generator = torch.Generator().manual_seed(train.seed)
    order = torch.randperm(len(run.examples), generator=generator).tolist()
    # preference pairs (DPO and kin): the scoring run learns and scores the chosen answers
    sample = [
        getattr(run.examples[i], "chosen", run.examples[i])
        for i in order[: _sample_size(len(run.examples), config.sample_fraction)]
    ]
    batches = [sample[i : i + train.batch_size] for i in range(0, len(sample), train.batch_size)]
    device = next(iter(trainable)).device
    objective = run.objective  # the task's: a classifier's rows train and score through its head
    optimizer = run.build_optimizer(trainable, train.model_copy(update={"lr": float(train.lr or config.default_lr)}))
    model.train()
    for step in range(config.sample_steps):
        batch = {k: v.to(device) for k, v in objective.collate(batches[step % len(batches)], run.pad_id).items()}
        loss, _ = objective.loss_sum(model, batch)
        (loss / max(objective.units(batch), 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sums = {name: torch.zeros((), dtype=torch.float64) for name in layers}
    mask: list[Any] = [None]

    def measure(layer_name: str):
        def hook(module: Any, args: tuple, output: Any) -> None:
            x = args[0].to(module.lora_A[ADAPTER].weight.dtype)
            delta = module.lora_B[ADAPTER](module.lora_A[ADAPTER](x)) * module.scaling[ADAPTER]
            per_token = delta.float().pow(2).sum(-1)  # ‖ΔW x‖² for each token
            sums[layer_name] += (per_token * mask[0]).sum().double().cpu()

        return hook

    handles = [
        module.register_forward_hook(measure(layer)) for layer, modules in layers.items() for module in modules.values()
    ]
    model.eval()
    tokens = 0
    try:
        with torch.no_grad():
            for examples in batches:
                batch = {k: v.to(device) for k, v in objective.collate(examples, run.pad_id).items()}
                mask[0] = batch["attention_mask"].float()
                tokens += int(batch["attention_mask"].sum())
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
                model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train()
        with torch.no_grad():
            for param, value in zip(trainable, initial, strict=True):
                param.copy_(value)
    g = {name: float(total) / max(tokens, 1) for name, total in sums.items()}
    total = sum(g.values())
    if not total > 0:  # nothing learned (lr 0?): every layer counts the same
        return {name: 1 / len(g) for name in g}
    return {name: value / total for name, value in g.items()}


def choose_layers(importance: dict[str, float], threshold: float) -> set[str]:
    """The fewest most important layers whose normalised importances sum to `threshold` or more."""
    kept, covered = set(), 0.0
    for name in sorted(importance, key=lambda n: -importance[n]):  # stable: ties keep model order
        if covered >= threshold - 1e-9:
            break
        kept.add(name)
        covered += importance[name]
    return kept


def share_adapters(layers: dict[str, dict[str, Any]], kept: set[str]) -> None:
    """Make the LoRA of every layer not in `kept` one shared A and B per module slot (the first
    shared layer's, so the shared adapter starts from that layer's init)."""
    first: dict[str, Any] = {}
    for layer, modules in layers.items():
        if layer in kept:
            continue
        for slot, module in modules.items():
            owner = first.setdefault(slot, module)
            if owner is module:
                continue
            for factor in ("lora_A", "lora_B"):
                mine, theirs = getattr(module, factor)[ADAPTER], getattr(owner, factor)[ADAPTER]
                if mine.weight.shape != theirs.weight.shape:
                    raise ModelError(
                        f"method.name: lora_drop shares one LoRA per module type, but {layer}{slot} has "
                        f"{tuple(mine.weight.shape)} where another layer's has {tuple(theirs.weight.shape)}"
                    )
                mine.weight = theirs.weight


def _read_choice(run_dir: Path | None, layers: dict[str, dict[str, Any]]) -> set[str]:
    path = Path(run_dir or ".") / RECORD
    try:
        record = json.loads(path.read_text())
        kept = set(record["kept"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(
            f"{path}: cannot read LoRA-drop's layer choice ({err}), which a resumed run needs; "
            "start the run again with --overwrite"
        ) from None
    unknown = sorted(kept - set(layers))
    if unknown:
        raise ModelError(
            f"{path}: kept layers {', '.join(unknown)} are not layers of this model; is this the same run?"
        )
    return kept


def _write_json(path: Path, record: dict) -> None:
    """Written whole or not at all (several processes of one run write the same record)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _summary(record: dict) -> str:
    kept, shared = record["kept"], record["shared"]
    covered = sum(entry["importance"] for entry in record["layers"] if entry["kept"])
    return (
        f"lora_drop: {len(kept)} of {len(record['layers'])} layers keep their own LoRA "
        f"({', '.join(kept)}; {100 * covered:.1f}% of the LoRA output, threshold {record['threshold']}); "
        f"{len(shared)} share one LoRA per module type"
    )
