"""Router training for a mixture of experts (a `MixtralForCausalLM`, e.g. from `ftkit merge` method moe).

Only the routers train: each layer's `mlp.gate` (transformers' MixtralTopKRouter, an experts × hidden
matrix; `block_sparse_moe.gate` in the checkpoint files). With `lora_experts: {r, alpha}` the experts
also get LoRA adapters (peft `target_parameters` on the fused `mlp.experts.gate_up_proj` and
`down_proj`, one rank-r pair per expert); the routers then train as peft `modules_to_save`, and
final/ holds the adapters merged in, so final/ is always a plain Mixtral model that `ftkit eval`,
`ftkit generate` and `AutoModelForCausalLM` load.

The training loss adds `aux_loss_coef` × the load-balancing loss of Switch Transformers / Mixtral
(transformers' `load_balancing_loss_func` over every layer's router logits, padding masked out):
N · Σ_e f_e · P_e, f_e the share of top-k picks that went to expert e, P_e its mean router
probability; it is smallest when tokens spread evenly. It is logged as `reg_loss` (the
objective's `loss` stays comparable across methods); evaluation gets the plain loss.

Which expert each val domain routes to is measured before training and after it and written to
the run's routing.json (report.md's "Routing" section): each val row's domain is its `domain`
column, else the name of its data file; per domain, the share of the top-k picks (all layers,
all non-padding tokens) whose highest router probability went to each expert (`share`), and
each expert's mean router probability (`mean_prob`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ftkit.data import read_rows
from ftkit.errors import ModelError
from ftkit.methods.base import MethodHooks, RunInfo
from ftkit.recipe.methods import MoeRouterConfig
from ftkit.rundir import ROUTING

#: val rows per forward pass when measuring routing
ROUTING_BATCH = 8


def model_problems(config: MoeRouterConfig, model_config: Any) -> list[str]:
    if getattr(model_config, "num_local_experts", None) is None:
        kind = getattr(model_config, "model_type", "?")
        return [
            f"method.name: moe_router trains the routers of a mixture of experts (Mixtral); this is a {kind} "
            "model with none: build one with `ftkit merge --config moe.yaml` (docs/moe.md)"
        ]
    return []


def routers(model: Any) -> dict[str, Any]:
    """{module name: router} for every MoE layer's router (`...mlp.gate`, a MixtralTopKRouter)."""
    return {
        name: module
        for name, module in model.named_modules()
        if type(module).__name__.endswith("TopKRouter") and hasattr(module, "weight")
    }


def apply(model: Any, config: MoeRouterConfig, run: RunInfo) -> Any:
    found = routers(model)
    if not found:
        raise ModelError("method.name: moe_router found no routers (mlp.gate) in this model; give a Mixtral model")
    if config.lora_experts is None:
        model.requires_grad_(False)
        for router in found.values():
            router.weight.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(
        r=config.lora_experts.r,
        lora_alpha=config.lora_experts.alpha,
        lora_dropout=0.0,
        target_modules=[],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        modules_to_save=["gate"],  # the routers: trained whole, saved with the adapters
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def hooks(model: Any, config: MoeRouterConfig, run: RunInfo) -> MethodHooks:
    """The load-balancing regularizer, routing before/after, and final/ as a plain Mixtral model."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    inner = _moe_config(model)
    captured: dict[str, Any] = {"logits": [], "mask": None}

    def start(module: Any, args: tuple, kwargs: dict) -> None:  # each forward of the decoder stack
        captured["logits"] = []
        captured["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    def record(module: Any, args: tuple, output: Any) -> None:
        captured["logits"].append(output[0])

    _decoder(model).register_forward_pre_hook(start, with_kwargs=True)
    for router in routers(model).values():
        router.register_forward_hook(record)

    def regularizer() -> Any:
        logits = tuple(captured["logits"][: inner.num_hidden_layers])
        mask = captured["mask"]
        if mask is not None and (mask.dim() != 2 or mask.shape[0] * mask.shape[1] != logits[0].shape[0]):
            mask = None  # packed rows: a 4-D mask; every token is real
        aux = load_balancing_loss_func(logits, inner.num_local_experts, inner.num_experts_per_tok, mask)
        return config.aux_loss_coef * aux

    before = measure_routing(model, run) if run.run_dir is not None else None

    def save_final(trained: Any, out_dir: Path) -> None:
        plain = trained.merge_and_unload() if config.lora_experts is not None else trained
        if run.run_dir is not None:
            after = measure_routing(plain, run)
            write_routing(Path(run.run_dir) / ROUTING, before, after, inner.num_local_experts)
        plain.save_pretrained(out_dir, safe_serialization=True)

    return MethodHooks(regularizer=regularizer if config.aux_loss_coef > 0 else None, save_final=save_final)


def _moe_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    while config is not None and getattr(config, "num_local_experts", None) is None and hasattr(model, "base_model"):
        model = model.base_model.model if hasattr(model.base_model, "model") else model.base_model
        config = getattr(model, "config", None)
    return config


def _decoder(model: Any) -> Any:
    """The decoder stack (MixtralModel), whose forward each training step starts with."""
    for module in model.modules():
        if type(module).__name__ == "MixtralModel" or (
            hasattr(module, "layers") and hasattr(module, "embed_tokens") and hasattr(module, "norm")
        ):
            return module
    raise ModelError("method.name: moe_router cannot find the model's decoder stack")


# ---------------------------------------------------------------- routing per val domain


def val_by_domain(run: RunInfo) -> dict[str, list[Any]]:
    """The run's val examples (as training tokenized them), grouped by their row's `domain`, else file name."""
    domains: dict[str, str] = {}
    for path in {str(ex.source).rsplit(":", 1)[0] for ex in run.val_examples}:
        for row, source in read_rows(path):
            domains[source] = str(row.get("domain") or Path(path).stem)
    grouped: dict[str, list[Any]] = defaultdict(list)
    for example in run.val_examples:
        grouped[domains.get(str(example.source), Path(str(example.source).rsplit(":", 1)[0]).stem)].append(example)
    return dict(sorted(grouped.items()))


def measure_routing(model: Any, run: RunInfo) -> dict[str, dict]:
    """Per domain: rows, tokens, each expert's share of first choices and mean router probability (all
    layers, non-padding tokens)."""
    if not run.val_examples:
        return {}
    grouped = val_by_domain(run)
    config = _moe_config(model)
    n = config.num_local_experts
    pad = run.pad_id if run.pad_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    result = {}
    with torch.no_grad():
        for domain, examples in grouped.items():
            top1, probs, tokens = torch.zeros(n), torch.zeros(n), 0
            for i in range(0, len(examples), ROUTING_BATCH):
                chunk = examples[i : i + ROUTING_BATCH]
                width = max(len(e.input_ids) for e in chunk)
                ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in chunk], device=device)
                mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in chunk])
                out = model(input_ids=ids, attention_mask=mask.to(device), output_router_logits=True)
                real = mask.reshape(-1).bool()
                for layer_logits in out.router_logits:
                    p = layer_logits.float().cpu().softmax(dim=-1)[real]
                    top1 += torch.bincount(p.argmax(dim=-1), minlength=n).float()
                    probs += p.sum(dim=0)
                tokens += int(real.sum())
            share = (top1 / top1.sum()).tolist()
            result[domain] = {"rows": len(examples), "tokens": tokens, "share": share,
                              "mean_prob": (probs / probs.sum()).tolist(),
                              "top_expert": int(torch.tensor(share).argmax())}  # fmt: skip
    model.train(was_training)
    return result


def write_routing(path: Path, before: dict | None, after: dict, experts: int) -> None:
    path.write_text(json.dumps({"experts": experts, "before": before or {}, "after": after}, indent=2) + "\n")
