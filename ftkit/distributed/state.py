"""Training state across processes: whole for saving, split again for resuming, and per process.

    gathered(accelerator, model, optimizer)      full state on the main process, for saving
    restore_sharded(model, opt, weights, ...)    full checkpoint tensors back into FSDP shards
    restore_deepspeed(accelerator, model, ...)   full checkpoint tensors back into ZeRO partitions
    rank_rng_states / restore_rank_rng           each process's generators in the checkpoint
    check_processes(accelerator, saved)          refuse a resume with another process count

Files are not read here: ftkit.train.resume reads a checkpoint and hands its tensors over.
Every function that gathers or scatters is a collective: every process calls it, in the same order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ftkit.distributed.collectives import is_deepspeed, is_sharded
from ftkit.errors import RunDirError

# --------------------------------------------------------------------------- saving


class GatheredModel:
    """Stands in for a sharded model where ftkit saves one: `save_pretrained` writes the
    gathered full state dict with the model's own (transformers / peft) `save_pretrained`."""

    def __init__(self, model: Any, state_dict: dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, out_dir: Any, **kwargs: Any) -> None:
        self.model.save_pretrained(out_dir, state_dict=self.state_dict, **kwargs)


class GatheredOptimizer:
    """Stands in for a sharded optimizer where ftkit saves one: `state_dict` is the gathered
    full state (keyed by parameter name, as torch.distributed.checkpoint gives it)."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def gathered(accelerator: Any, model: Any, optimizer: Any = None) -> tuple[Any, Any]:
    """(model, optimizer) as the main process saves them; every process must call this.

    Replicated (ddp, one process): the unwrapped model and the optimizer themselves.
    FSDP: full state dicts gathered to the main process's CPU through
    `torch.distributed.checkpoint.state_dict` (what accelerate's `get_state_dict` uses for
    FSDP2), wrapped so ftkit's pickle-free savers write them. DeepSpeed: the weights
    through `accelerator.get_state_dict` (ZeRO-3 consolidates them), the trainable ones
    replaced by their fp32 masters, and the optimizer state in the same by-name layout
    (`_deepspeed_full_state`).
    """
    unwrapped = accelerator.unwrap_model(model)
    if is_sharded(model):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        optim = None
        if optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
            optim = GatheredOptimizer(get_optimizer_state_dict(model, inner, options=options))
        return GatheredModel(unwrapped, weights), optim
    if is_deepspeed(accelerator):
        weights = accelerator.get_state_dict(model)  # ZeRO-3: the 16-bit weights consolidated on the main process
        if optimizer is None:
            return GatheredModel(unwrapped, weights), None
        masters, state = _deepspeed_full_state(unwrapped, optimizer)
        # the checkpoint holds the fp32 master weights of what trains (bit-exact resume under bf16 too)
        weights = {**weights, **masters} if accelerator.is_main_process else weights
        return GatheredModel(unwrapped, weights), GatheredOptimizer(state)
    return unwrapped, optimizer


def _deepspeed_full_state(unwrapped: Any, optimizer: Any) -> tuple[dict, dict]:
    """({name: fp32 master weight}, full optimizer state keyed by parameter name) of every
    trainable parameter, assembled from ZeRO's partitions with DeepSpeed's public
    `deepspeed.utils.safe_get_full_*` (collectives: every process calls this, in the same order).

    The optimizer state has the layout of torch.distributed.checkpoint's full state dict
    (as under fsdp): {"state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]},
    so it is written by ftkit's pickle-free checkpoint code like any other.
    """
    # DeepSpeed is an optional extra (ftkit[deepspeed]): imported only when it runs the model
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = _deepspeed_base_optimizer(optimizer)
    steps = [entry["step"] for entry in base.state.values() if "step" in entry]
    step = torch.as_tensor(steps[0], dtype=torch.float32).cpu() if steps else None
    masters, state = {}, {}
    for name, param in unwrapped.named_parameters():
        if not param.requires_grad:
            continue
        masters[name] = safe_get_full_fp32_param(param).detach().cpu()
        if step is None:  # no step yet: no optimizer state
            continue
        state[name] = {"step": step.clone()} | {
            key: safe_get_full_optimizer_state(param, key).detach().cpu() for key in ("exp_avg", "exp_avg_sq")
        }
    groups = [{key: value for key, value in group.items() if key != "params"} for group in base.param_groups]
    groups[0]["params"] = list(state)  # ZeRO flattens the groups' parameters; the states are per name
    for group in groups[1:]:
        group["params"] = []
    return masters, {"state": state, "param_groups": groups}


def _deepspeed_base_optimizer(optimizer: Any) -> Any:
    """The torch optimizer ZeRO steps on its flat fp32 partitions
    (accelerate's wrapper → DeepSpeed's ZeRO optimizer → torch's)."""
    return optimizer.optimizer.optimizer


# --------------------------------------------------------------------------- resuming


def restore_sharded(model: Any, optimizer: Any, weights: dict, optimizer_state: dict, source: Path) -> None:
    """Put a checkpoint's full tensors (as `gathered` saved them) into an FSDP model's and optimizer's shards.

    `weights` are the checkpoint's tensors by saved name, `optimizer_state` its full optimizer
    state dict; `source` (the checkpoint) is named in errors. Every process passes the full
    tensors and keeps its shard, through torch.distributed.checkpoint's `set_model_state_dict`
    / `set_optimizer_state_dict` (full state dicts). Adapter tensors are saved under peft's
    names; the model's names for them are found by asking peft (`_parameter_names`).
    """
    names = _parameter_names(model, weights)
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise RunDirError(f"{source}: tensors the model does not have: {', '.join(unknown[:3])}")
    full = {names[key]: tensor for key, tensor in weights.items()}
    absent = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in full)
    if absent:
        raise RunDirError(f"{source}: no saved weights for trainable {', '.join(absent[:3])}; is this the same method?")
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    try:
        set_optimizer_state_dict(model, inner, optimizer_state, options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError) as err:
        raise RunDirError(f"{source}: the optimizer state does not fit this sharded optimizer ({err})") from None


def restore_deepspeed(
    accelerator: Any, model: Any, optimizer: Any, weights: dict, optimizer_state: dict, source: Path
) -> None:
    """Put a checkpoint's full tensors (as `gathered` saved them) back into ZeRO's partitions, exactly.

    `weights` and `optimizer_state` as for `restore_sharded`. ZeRO creates the optimizer
    state at its first step, so: (1) the fp32 master weights are set
    (`safe_set_full_fp32_param`); (2) one step with lr 0 on a zero loss runs: with zero
    gradients AdamW changes no weight (lr × 0 / (0 + eps) = 0, decay × lr = 0), creates the
    state and copies the masters into the model's (possibly partitioned) weights; (3) the
    moments and the step count are set (`safe_set_full_optimizer_state`; the step on the
    torch optimizer's state). Every process runs this (collectives); the zero step draws
    from the generators, which the caller restores afterwards.
    """
    # DeepSpeed is an optional extra (ftkit[deepspeed]): imported only when it runs the model
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    unwrapped = accelerator.unwrap_model(model)
    names = _parameter_names(unwrapped, weights)
    full = {names[key]: tensor for key, tensor in weights.items() if key in names}
    trainable = [(name, p) for name, p in unwrapped.named_parameters() if p.requires_grad]
    absent = [name for name, _ in trainable if name not in full]
    if absent:
        raise RunDirError(f"{source}: no saved weights for trainable {', '.join(absent[:3])}; is this the same method?")
    states = optimizer_state["state"]
    if any(name not in states for name, _ in trainable):
        raise RunDirError(f"{source}: the optimizer state does not name this run's trainable parameters")
    device = accelerator.device
    for name, param in trainable:
        safe_set_full_fp32_param(param, full[name].to(device, torch.float32))

    for group in optimizer.param_groups:
        group["lr"] = 0.0  # the loop sets the step's LR before its next step
    ids = torch.tensor([[1, 2, 3]], device=device)
    accelerator.sync_gradients = True  # the engine steps inside this backward
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().sum() * 0.0
    accelerator.backward(loss, scale_wrt_gas=False)

    for name, param in trainable:
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(param, states[name][key].to(device, torch.float32), key)
    step = float(states[trainable[0][0]]["step"])
    base = _deepspeed_base_optimizer(optimizer)
    for entry in base.state.values():
        entry["step"] = torch.full_like(torch.as_tensor(entry["step"]), step)


def _parameter_names(model: Any, saved: dict) -> dict[str, str]:
    """{name in the checkpoint: name in the model}: peft renames adapter tensors when it saves them."""
    current = model.state_dict()  # sharded tensors, no gathering
    if not hasattr(model, "peft_config"):
        return {key: key for key in saved if key in current}
    by_identity = {id(tensor): name for name, tensor in current.items()}
    as_saved = get_peft_model_state_dict(model, state_dict=current)
    return {key: by_identity[id(tensor)] for key, tensor in as_saved.items() if id(tensor) in by_identity}


# --------------------------------------------------------------------------- per process


def rank_rng_states(accelerator: Any) -> dict:
    """{"processes": N, "rng_ranks": [hex, ...]} for the checkpoint (every process must call it).

    Each process draws its own dropout masks, so its torch generators (CPU, and its own
    CUDA device) differ from the main process's after the first step; they are gathered
    here so a resume gives every process back its own (`restore_rank_rng`). The number of
    processes is saved too: the global batch is batch_size × processes, so a resume with
    another count would be another trajectory (`check_processes`). Empty for one process.
    """
    if accelerator.num_processes == 1:
        return {}
    state = _rng_bytes(accelerator).to(accelerator.device)
    gathered_states = accelerator.gather(state.unsqueeze(0)).cpu()
    return {"processes": accelerator.num_processes, "rng_ranks": [bytes(row.tolist()).hex() for row in gathered_states]}


def _rng_bytes(accelerator: Any) -> torch.Tensor:
    parts = [torch.get_rng_state()]
    if accelerator.device.type == "cuda":
        parts.append(torch.cuda.get_rng_state(accelerator.device))
    return torch.cat(parts)


def restore_rank_rng(accelerator: Any, saved: dict) -> None:
    """Give this process back its own torch generator states from the checkpoint's trainer state.
    Call after ftkit.train.checkpoint.restore_rng, which restores the main process's."""
    ranks = saved.get("rng_ranks")
    if not ranks or accelerator.num_processes == 1:
        return
    state = torch.tensor(list(bytes.fromhex(ranks[accelerator.process_index])), dtype=torch.uint8)
    cpu_size = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu_size])
    if accelerator.device.type == "cuda":
        torch.cuda.set_rng_state(state[cpu_size:], accelerator.device)


def check_processes(accelerator: Any, saved: dict) -> None:
    """Refuse to resume with another number of processes than the checkpoint was written with."""
    before, now = int(saved.get("processes", 1)), accelerator.num_processes
    if before != now:
        raise RunDirError(
            f"--resume: the checkpoint was written by {before} process(es), this run has {now}; the global batch is "
            f"train.batch_size × processes, so resume with --nproc {before} (or start a new run)"
        )
