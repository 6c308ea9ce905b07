"""The engines: accelerate's Accelerator with the recipe's strategy, and the model wrapped for it.

build_accelerator(recipe, mixed_precision)   Accelerator with the strategy's plugin
fsdp_plugin(recipe)                          accelerate's FSDP2 plugin, from the recipe
deepspeed_config(recipe, world, precision)   the DeepSpeed JSON, from the recipe
prepare(accelerator, recipe, model, opt)     wrap / shard model and optimizer
describe(accelerator, recipe)                ' · 2 processes (fsdp)' for the start-up line
check_method_hooks(accelerator, recipe, h)   refuse whole-tensor method hooks on shards
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.parallelism_config import ParallelismConfig
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    is_deepspeed_available,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers.integrations import unset_hf_deepspeed_config

from ftkit.distributed import DistributedError
from ftkit.distributed.collectives import is_deepspeed
from ftkit.distributed.launch import is_launched, world_size

#: keys of the DeepSpeed config that ftkit derives from the recipe; a user file may not disagree
DEEPSPEED_OWNED_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
    "zero_optimization.stage",
    "zero_optimization.offload_optimizer.device",
    "zero_optimization.offload_param.device",
)


def build_accelerator(recipe: Any, mixed_precision: str) -> Accelerator:
    """An `accelerate.Accelerator` set up for `recipe.distributed`.

    The recipe is the one source of truth: when a launcher's accelerate config (env
    ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED) names another strategy, DistributedError.
    fsdp on CPU gets no plugin (accelerate runs FSDP only on accelerators); `prepare` shards.
    """
    d = recipe.distributed
    launched_as = _launcher_strategy()
    if launched_as is not None and launched_as != d.strategy:
        raise DistributedError(
            f"distributed.strategy: the launcher's accelerate config uses {launched_as}, the recipe says {d.strategy}; "
            f"set distributed.strategy: {launched_as} in the recipe (ftkit takes the strategy from the recipe)"
        )
    kwargs: dict[str, Any] = {"mixed_precision": mixed_precision}
    on_gpu = torch.cuda.is_available()
    if is_launched() and not on_gpu:
        kwargs["cpu"] = True  # accelerate starts a CPU (gloo) process group only when told it is on CPU
    if d.strategy == "deepspeed":
        if not is_deepspeed_available():
            raise DistributedError("distributed.strategy: deepspeed needs DeepSpeed: pip install 'ftkit[deepspeed]'")
        config = deepspeed_config(recipe, world_size(), mixed_precision)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False)
        # accelerate checks the DeepSpeed config's accumulation against its own; it does not divide
        # the loss by it under DeepSpeed (the loop normalises by tokens, see collectives.backward)
        kwargs["gradient_accumulation_steps"] = recipe.train.grad_accum
        if not on_gpu:
            # accelerate ignores the DeepSpeed plugin when told cpu=True, and without a backend it
            # counts one process; DeepSpeed's CPU accelerator runs on gloo when oneCCL is absent
            kwargs.pop("cpu", None)
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        accelerator = Accelerator(**kwargs)  # DeepSpeed's logs and prints: stderr (ftkit.io, for every command)
        # accelerate registers the config with transformers whatever zero3_init_flag says, and under
        # ZeRO-3 transformers then partitions weights while loading (deepspeed.zero.Init): a
        # collective every process must join, but ftkit loads on the main process first
        # (a built-in base is written once, then read by the others). So each process loads the
        # whole model and `prepare` partitions it, and registers the config again (generate's
        # synced_gpus needs it under ZeRO-3).
        unset_hf_deepspeed_config()
        return accelerator
    elif d.strategy == "fsdp" and on_gpu:
        kwargs["fsdp_plugin"] = fsdp_plugin(recipe)
        if d.sharding == "hybrid":
            nodes, per_node = _nodes()
            kwargs["parallelism_config"] = ParallelismConfig(dp_replicate_size=nodes, dp_shard_size=per_node)
    return Accelerator(**kwargs)


def _launcher_strategy() -> str | None:
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return None


def _nodes() -> tuple[int, int]:
    """(nodes, processes per node) from torchrun's environment."""
    world = world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world % per_node:
        raise DistributedError(
            f"distributed.sharding: hybrid needs equal nodes; {world} processes, {per_node} per node"
        )
    return world // per_node, per_node


def fsdp_plugin(recipe: Any) -> FullyShardedDataParallelPlugin:
    """accelerate's FSDP2 plugin for the recipe.

    One shard unit per decoder layer (the classes in the model's `_no_split_modules`),
    weights resharded after forward (full sharding), CPU offload of weights, gradients and
    the optimizer step with `offload: params`. Mixed precision comes from
    `train.mixed_precision` through the Accelerator (bf16 compute, fp32 gradient reduction).
    Every field that would otherwise be read from FSDP_* environment variables is set here.
    """
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        cpu_offload=recipe.distributed.offload == "params",
        state_dict_type="FULL_STATE_DICT",
        activation_checkpointing=False,  # model.gradient_checkpointing does it, through transformers
        cpu_ram_efficient_loading=False,
    )


def deepspeed_config(recipe: Any, world: int, mixed_precision: str) -> dict:
    """The DeepSpeed config for the recipe; batch geometry and precision come from the recipe only.

        train_micro_batch_size_per_gpu = train.batch_size
        gradient_accumulation_steps    = train.grad_accum
        train_batch_size               = batch_size × grad_accum × processes (DeepSpeed checks this identity)
        gradient_clipping              = train.max_grad_norm (0 = off)
        zero_optimization.stage        = distributed.zero_stage; offload of optimizer / params to CPU
        bf16 / fp16                    = train.mixed_precision as resolved

    With `distributed.deepspeed_config` its other settings are kept; a key above with another
    value there (other than "auto") is a DistributedError naming the file and key.
    """
    d, t = recipe.distributed, recipe.train
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if d.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # final/ must hold whole weights
    ours = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world,
        "gradient_clipping": float(t.max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # ftkit passes torch AdamW, which ZeRO runs fine
        # with offload, torch AdamW steps the CPU partitions (the recipe's optimizer, the same maths
        # as one process) instead of DeepSpeed's compiled CPU Adam
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # progress is ftkit's; DeepSpeed would print to stdout
    }
    if d.deepspeed_config is None:
        return ours
    path = Path(d.deepspeed_config)
    try:
        theirs = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DistributedError(f"distributed.deepspeed_config: cannot read {path}: {err}") from None
    if not isinstance(theirs, dict):
        raise DistributedError(f"distributed.deepspeed_config: {path} must hold a JSON object")
    conflicts = []
    for key in DEEPSPEED_OWNED_KEYS:
        mine, given = _get(ours, key), _get(theirs, key)
        if given not in (None, "auto") and given != mine and not (key.endswith(".device") and given == "none" == mine):
            conflicts.append(f"{key} is {json.dumps(given)} there, {json.dumps(mine)} from the recipe")
    if conflicts:
        raise DistributedError(
            f"distributed.deepspeed_config: {path}: {'; '.join(conflicts)}; remove these keys (or set them to "
            '"auto"): batch sizes, accumulation, clipping, precision and ZeRO stage/offload come from the recipe'
        )
    return _merge(theirs, ours)


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def prepare(accelerator: Accelerator, recipe: Any, model: Any, optimizer: Any) -> tuple[Any, Any]:
    """Wrap or shard the model and optimizer for the strategy; returns the objects the loop uses.

    Everything goes through `accelerator.prepare`, except fsdp on CPU (accelerate would
    wrap the model in DDP there): the model is sharded with torch's `fully_shard`, one unit
    per decoder layer, embeddings, norm + head, and the root; the optimizer, which holds no
    state yet, is pointed at the sharded parameters (FSDP2 replaces every parameter with a
    DTensor of the same name).
    """
    if is_deepspeed(accelerator):
        prepared = accelerator.prepare(model, optimizer)  # deepspeed.initialize: its logs go to stderr (ftkit.io)
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()  # see build_accelerator
        return prepared
    sharding = recipe.distributed.strategy == "fsdp" and accelerator.num_processes > 1
    if not sharding or accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.prepare(model, optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    _fully_shard_cpu(model, recipe, accelerator)
    sharded = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return model, accelerator.prepare(optimizer)


def _fully_shard_cpu(model: Any, recipe: Any, accelerator: Accelerator) -> None:
    """FSDP2 on CPU processes, with the units accelerate's plugin makes on GPUs."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    if not layer_classes:
        raise DistributedError(
            f"distributed.strategy: fsdp needs the model's decoder layer class (_no_split_modules); "
            f"{type(model).__name__} names none"
        )
    kwargs: dict[str, Any] = {}
    if accelerator.mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if recipe.distributed.sharding == "hybrid":
        kwargs["mesh"] = init_device_mesh("cpu", _nodes(), mesh_dim_names=("replicate", "shard"))
    # 4-bit weights packed in uint8 do not survive the conversion to DTensor (their quant_state
    # is lost): like accelerate, keep them whole on every process and shard the rest
    packed = {p for p in model.parameters() if type(p).__name__ == "Params4bit" and not p.is_floating_point()}
    if packed:
        kwargs["ignored_params"] = packed
    for module in list(model.modules()):
        if type(module).__name__ in layer_classes:
            fully_shard(module, **kwargs)
    # Embeddings and the final norm + head are units of their own, as accelerate makes them:
    # their hooks then fire on their own forward, also in `generate`, which bypasses the root's.
    embed = model.get_input_embeddings()
    tail = [m for m in (getattr(model.get_decoder(), "norm", None), model.get_output_embeddings()) if m is not None]
    if embed is not None and all(embed.weight is not m.weight for m in tail if hasattr(m, "weight")):
        fully_shard(embed, **kwargs)
    if tail:
        fully_shard(tail, **kwargs, reshard_after_forward=False)  # used at once by backward: keep gathered
    fully_shard(model, **kwargs)


def describe(accelerator: Accelerator, recipe: Any) -> str:
    """' · 2 processes (fsdp)' for the start-up line; empty for one process."""
    n = accelerator.num_processes
    return f" · {n} processes ({recipe.distributed.strategy})" if n > 1 else ""


def check_method_hooks(accelerator: Accelerator, recipe: Any, hooks: Any) -> None:
    """Refuse a method's own training hooks under a strategy that splits tensors over processes.

    Hooks such as AdaLoRA's budget reallocation, LoRA-FA's projected-gradient optimizer or
    PiSSA's final conversion read whole weights and gradients; under fsdp / deepspeed each
    process holds only a shard. Under ddp every process holds everything and the gradients
    are already averaged when the hooks run, so they run unchanged. Parameter groups
    (LoRA+) are fine everywhere.
    """
    strategy = recipe.distributed.strategy
    if hooks.objective is not None and strategy == "ddp" and accelerator.num_processes > 1:
        raise DistributedError(
            f"method.name: {recipe.method.name} trains through its own objective, whose forward is not the "
            "ddp-wrapped model's (gradients would not be synchronised); train it on one process"
        )
    if strategy == "ddp":
        return
    own = [
        name
        for name in ("optimizer", "before_zero_grad", "after_step", "regularizer", "save_final", "state", "objective")
        if getattr(hooks, name)
    ]
    if own:
        raise DistributedError(
            f"method.name: {recipe.method.name} runs its own training hooks ({', '.join(own)}) on whole tensors, "
            f"which distributed.strategy {strategy} splits over processes; use distributed.strategy: ddp"
        )
