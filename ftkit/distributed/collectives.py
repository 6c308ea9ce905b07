"""What the processes do together inside the loop and the objectives.

    rank_slice / rank_examples    this process's part of a global micro-batch
    loss_scale                    the factor on each process's loss (N)
    global_sums / any_process     all-reduce of a few floats / of a flag
    micro_step / backward         one forward/backward of an accumulation window
    grad_norm                     the window's global gradient norm (clipped)
    is_sharded / is_deepspeed     which engine holds the model
    local_tensor                  this process's part of a (possibly sharded) tensor
    own_dir                       where a process writes files beside its work

With one process every function here is the plain one-process operation.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule


def rank_slice(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Process `rank`'s contiguous part of a global micro-batch (part sizes differ by at most one).

    Concatenating the parts of ranks 0 … world-1 gives `indices` back: nothing is dropped or
    repeated. With world = 1 it is `indices`.
    """
    n = len(indices)
    return list(indices[rank * n // world : (rank + 1) * n // world])


def rank_examples(examples: Sequence[Any], indices: Sequence[int], rank: int, world: int) -> tuple[list[Any], float]:
    """(examples, weight) of this process's slice of a global micro-batch.

    A global batch smaller than the number of processes (the last one of an epoch can be)
    leaves some slices empty. Such a process still runs one forward/backward, because every
    process must join the same collectives: on the batch's last example with weight 0,
    which the loop applies to its loss, units, metrics and tokens, so it adds nothing. The
    weight works for every objective (SFT examples, preference pairs ...).
    """
    part = rank_slice(indices, rank, world)
    if part:
        return [examples[i] for i in part], 1.0
    return [examples[indices[-1]]], 0.0


def loss_scale(accelerator: Any) -> int:
    """The factor on each process's loss: the number of processes N.

    Each process's loss is (its window's loss sum) / U, U = the loss units of the whole
    window summed over all processes. DDP, FSDP and ZeRO all *average* gradients over the
    processes, g = (1/N) Σ_r g_r, so scaling each process's loss by N gives
    g = Σ_r ∇(loss sum_r) / U = ∇(loss sum of the global window) / U: exactly the
    one-process gradient of the same global window.
    """
    return accelerator.num_processes


def any_process(accelerator: Any, flag: bool) -> bool:
    """True on every process when `flag` is True on any: decisions that change which
    collectives run next (stop at this step boundary, generate samples) must be the same everywhere."""
    return bool(flag) if accelerator.num_processes == 1 else global_sums(accelerator, [float(bool(flag))])[0] > 0


def global_sums(accelerator: Any, values: Sequence[float]) -> list[float]:
    """Sum `values` (same length and order on every process) over all processes, in float64."""
    if accelerator.num_processes == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()


@contextlib.contextmanager
def micro_step(accelerator: Any, model: Any, is_last: bool) -> Iterator[None]:
    """One forward/backward of an accumulation window.

    Gradients are synchronised over processes on the window's last backward only; before
    that they accumulate locally (the same sum, one all-reduce or reduce-scatter per step
    instead of one per micro-step). `accelerator.sync_gradients` tells DeepSpeed where the
    boundary is, since it steps its engine inside backward; accelerate's optimizer steps
    only when it is True, which the last micro-step leaves it.
    """
    accelerator.sync_gradients = is_last
    if is_last or accelerator.num_processes == 1:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


def backward(accelerator: Any, loss: Any) -> None:
    """`accelerator.backward`; under DeepSpeed without its division by grad_accum, because the
    loop's loss is already divided by the window's loss units."""
    if is_deepspeed(accelerator):
        accelerator.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def grad_norm(accelerator: Any, params: Sequence[Any], max_norm: float | None) -> float:
    """The window's global gradient norm, clipped to `max_norm` when given.

    Under DeepSpeed the engine has already clipped (config gradient_clipping = train.max_grad_norm)
    and stepped inside the window's last backward, and ZeRO keeps the gradients in its own
    partitions (`p.grad` is None), so the norm is the engine's, read through accelerate.
    """
    if max_norm is not None or is_deepspeed(accelerator):
        return float(accelerator.clip_grad_norm_(params, max_norm or 0.0))  # unscales fp16 gradients first
    if has_loss_scaler(accelerator):
        accelerator.unscale_gradients()
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


def has_loss_scaler(accelerator: Any) -> bool:
    """True when accelerate scales the loss (fp16 on a GPU): its scaler skips a step whose scaled
    gradients overflow and lowers the scale, so an inf gradient norm is not an error there."""
    return getattr(accelerator, "scaler", None) is not None


def is_deepspeed(accelerator: Any) -> bool:
    """True when DeepSpeed's engine holds the model (it steps inside backward)."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_sharded(model: Any) -> bool:
    """True for a model whose parameters are split over processes (FSDP2)."""
    return isinstance(model, FSDPModule)


def local_tensor(tensor: Any) -> Any:
    """This process's part of a (possibly sharded) tensor, which checks such as isfinite run on: a
    DTensor's local shard (FSDP2), a ZeRO-3 parameter's partition (`ds_tensor`: the parameter itself
    is an empty placeholder between forward passes), else the tensor itself."""
    if hasattr(tensor, "to_local"):
        return tensor.to_local()
    partition = getattr(tensor, "ds_tensor", None)
    return partition if partition is not None else tensor


@contextlib.contextmanager
def own_dir(accelerator: Any, run_dir: Path) -> Iterator[Path]:
    """The run directory on the main process; elsewhere a temporary directory, removed after.
    For steps that write files beside their work (DPO's precomputed reference): written once."""
    if accelerator.is_main_process:
        yield run_dir
        return
    with tempfile.TemporaryDirectory(prefix="ftkit-process-") as tmp:
        yield Path(tmp)
