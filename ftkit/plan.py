"""`ftkit plan`: peak GPU memory and speed of a recipe, from the model's config alone.

The model is built on the meta device (shapes, no weights, no download besides a hub
model's config.json) and the recipe's method is applied to it, so parameter counts and
trainable parameters are exact for every registered method. Memory is the sum of

    weights      frozen base: dtype bytes, or NF4: 0.5 B + quantization constants per
                 weight of a linear layer (64-weight blocks; fp32 absmax = 4/64 B, or with
                 double quantization 8-bit absmax + fp32 per 256 blocks = 1/64 + 4/16384 B);
                 embeddings, head and norms stay 16-bit (ftkit does not upcast them).
                 Trained weights as `train.master_weights` keeps them (`trained_bytes_per_param`):
                 on a 16-bit model fp32 masters by default (4 B + the 2 B copy autocast computes with).
    gradients    one per trainable weight, in its dtype.
    optimizer    AdamW: two states in the weight's dtype (8 B/param for fp32 weights);
                 bitsandbytes 8-bit: 2 B/param (+ blockwise constants); paged: the same
                 bytes, in memory the driver may page to the CPU under pressure.
    activations  bytes saved for backward per token per layer (see `layer_activation_bytes`);
                 with checkpointing only each layer's input stays (on the CPU with
                 offload) plus one layer recomputed at a time.
    logits       full: every position's logits in 16 bits, their fp32 copy, the fp32
                 log-softmax kept for backward and its gradient; chunked (ftkit's default):
                 one chunk of them.

16 B/param for mixed-precision AdamW full fine-tuning falls out of it (4 weight + 4 grad +
8 optimizer), as does QLoRA's 65B on a 48 GB GPU (tests/unit/test_plan.py).

Several GPUs (`processes` N, the recipe's `distributed` section): `per_gpu` splits the
state as `sharded_state_bytes` says (ZeRO-1 optimizer state, ZeRO-2 also
gradients, ZeRO-3 / fsdp also weights; hybrid fsdp within a node; offload to CPU RAM).
DeepSpeed with bf16/fp16 casts the whole model to 16 bits and keeps the fp32 master
weights in its optimizer: 2 B weights + 2 B gradients + (4 + Adam's 8) B optimizer per
trainable parameter, the ZeRO paper's 2Ψ + 2Ψ + 12Ψ. Where weights are sharded, the
layer being computed and the next one (prefetched) are gathered whole. 4-bit packed
weights are not sharded (FSDP keeps them whole on every process). Activations and logits
are per process: `train.batch_size` is per process, so they do not shrink with N.

Speed: model FLOPs per token are 6N for full fine-tuning and 4N for frozen weights
(forward 2N, backward through activations 2N, weight gradients 2N only where weights
train), N = weights in matmuls, plus attention (causal: 2·ctx·d per layer forward, ×3
with backward). Checkpointing recomputes the forward. tokens/s = utilisation × peak
FLOP/s / FLOPs actually executed; the utilisation is an assumption (`--utilisation`),
stated in the output.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.padding import Padding
from rich.table import Table

from ftkit.distributed.launch import world_size
from ftkit.errors import FtkitError
from ftkit.methods import get_method
from ftkit.models.load import load_model_config, skeleton
from ftkit.recipe.schema import Recipe

GIB = 2**30


class PlanError(FtkitError):
    """A plan option that cannot be honoured (an unknown --gpu)."""

    exit_code = 2


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bf16_tflops: float  # dense bf16 (fp16 on cards without bf16) tensor-core peak
    has_bf16: bool = True


#: published dense 16-bit tensor peaks (no sparsity); memory as the card is sold
GPUS: dict[str, Gpu] = {
    gpu.name: gpu
    for gpu in (
        Gpu("h100-80gb", 80 * GIB, 989.0),
        Gpu("h100-pcie", 80 * GIB, 756.0),
        Gpu("h200", 141 * GIB, 989.0),
        Gpu("a100-80gb", 80 * GIB, 312.0),
        Gpu("a100-40gb", 40 * GIB, 312.0),
        Gpu("l40s", 48 * GIB, 362.0),
        Gpu("a6000", 48 * GIB, 155.0),
        Gpu("l4", 24 * GIB, 121.0),
        Gpu("4090", 24 * GIB, 165.0),
        Gpu("3090", 24 * GIB, 71.0),
        Gpu("a10", 24 * GIB, 125.0),
        Gpu("t4", 16 * GIB, 65.0, has_bf16=False),
    )
}
DEFAULT_GPU = "h100-80gb"
#: sustained fraction of peak on the FLOPs a step executes; a round figure between the plain
#: transformers + peft stack (~17-34 % MFU on an H100, issue 9) and tuned stacks (~50 %)
DEFAULT_UTILISATION = 0.4
#: CUDA context, allocator fragmentation and workspace that `max_memory_allocated` does not see
DEVICE_RESERVE_BYTES = GIB

NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}  # by double_quant
OPTIMIZER_BYTES_8BIT = 2 + 2 * 4 / 256  # two 8-bit states + fp32 absmax per 256-value block


@dataclass
class Plan:
    """The estimate: counts, a memory breakdown (bytes), and speed at the stated utilisation."""

    model: str
    method: str
    gpu: str
    params_total: int
    params_trainable: int
    shape: dict[str, int]
    tokens_per_micro_step: int
    memory: dict[str, int]
    peak_bytes: int
    flops_per_token: float  # model FLOPs (no recompute): the MFU basis
    executed_flops_per_token: float  # with recomputation
    utilisation: float
    tokens_per_s: float | None
    mfu: float | None
    steps: int | None
    wall_s: float | None
    fits: bool
    notes: list[str] = field(default_factory=list)
    recipe_keys: dict[str, Any] = field(default_factory=dict)
    processes: int = 1
    #: with several processes or a sharding strategy: per-GPU memory (bytes), CPU RAM for offload,
    #: the strategy in words, and whether it fits; None for plain one-GPU training
    per_gpu: dict[str, Any] | None = None
    #: bytes per trained parameter: weights (+ master copy / compensation), gradients, optimizer, total
    trained_bytes_per_param: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def advice(self) -> str:
        """The recipe keys that lower the peak, largest saving first."""
        keys = self.recipe_keys
        tips = []
        if not keys.get("gradient_checkpointing"):
            tips.append("model.gradient_checkpointing: true")
        elif keys.get("gradient_checkpointing") is True:
            tips.append("model.gradient_checkpointing: offload")
        if keys.get("batch_size", 1) > 1:
            tips.append("a smaller train.batch_size with a larger train.grad_accum")
        if keys.get("method") in ("full", "freeze"):
            tips.append("method.name: lora or qlora")
        elif keys.get("method") == "lora":
            tips.append("method.name: qlora")
        strategy = keys.get("strategy", "ddp")
        if self.processes > 1 and strategy == "ddp":
            tips.append("distributed.strategy: fsdp (shards weights, gradients and optimizer state)")
        elif strategy == "deepspeed" and keys.get("zero_stage", 2) < 3:
            tips.append("distributed.zero_stage: 3")
        if strategy != "ddp" and keys.get("offload", "none") == "none":
            tips.append("distributed.offload: " + ("optimizer" if strategy == "deepspeed" else "params"))
        if keys.get("optimizer") in ("adamw", "paged_adamw_32bit") and strategy == "ddp":
            tips.append("train.optimizer: paged_adamw_8bit")
        tips.append("a shorter data.max_length")
        return "To fit, try " + "; ".join(tips) + "."


def estimate(
    recipe: Recipe,
    gpu: str | None = None,
    utilisation: float = DEFAULT_UTILISATION,
    n_examples: int | None = None,
    processes: int = 1,
    gpus_per_node: int | None = None,
) -> Plan:
    """The plan of `recipe` on `gpu` (a key of GPUS; default: this machine's GPU, else h100-80gb),
    run as `processes` processes (one per GPU; `gpus_per_node` for fsdp hybrid sharding)."""
    spec = _gpu(gpu)
    config = load_config(recipe)
    model = _meta_model(config, recipe)
    counts = _parameter_counts(model, config)
    shape = _shape(config)

    dtype_bytes = _weight_bytes(recipe.model.dtype, spec)
    quant = recipe.model.quantization
    mixed = recipe.train.mixed_precision != "no" and (recipe.train.mixed_precision != "auto" or spec.has_bf16)
    act_bytes = 2 if (dtype_bytes == 2 or mixed) else 4  # activations in the autocast / weight dtype
    trained = trained_bytes_per_param(recipe.train.master_weights, dtype_bytes, recipe.train.optimizer)

    frozen = counts["total"] - counts["trainable"]
    if quant is not None:
        quantized = counts["linear_frozen"]
        weights = quantized * NF4_BYTES[quant.double_quant] + (frozen - quantized) * act_bytes
    else:
        weights = frozen * dtype_bytes
    weights += counts["trainable"] * trained["weights"]
    gradients = counts["trainable"] * trained["gradients"]
    optimizer = counts["trainable"] * trained["optimizer"]

    batch, length = recipe.train.batch_size, recipe.data.max_length
    tokens = batch * length
    per_layer = layer_activation_bytes(shape, act_bytes, recipe, counts["adapted_inputs"] // shape["layers"])
    checkpointing = recipe.model.gradient_checkpointing
    residual = tokens * shape["hidden"] * (4 if (mixed and dtype_bytes == 4) else act_bytes)
    if not checkpointing:
        activations = shape["layers"] * tokens * per_layer + residual
    elif checkpointing == "offload":
        activations = tokens * per_layer + 2 * residual  # one layer recomputed, inputs in flight
    else:
        activations = tokens * per_layer + shape["layers"] * residual
    vocab = shape["vocab"]
    chunk = recipe.perf.loss_chunk_size
    trained_tokens = tokens  # upper bound: completion-only training computes fewer
    if chunk is None or recipe.perf.kernels == "liger":
        logits = trained_tokens * vocab * (act_bytes + 4 + 4 + 4)
        if recipe.perf.kernels == "liger":
            logits = min(trained_tokens, 4096) * vocab * (act_bytes + 4)
    else:
        # one chunk: fp32 logits (softmax in place) beside the 16-bit matmul output or gradient;
        # plus the gradient of the hidden states kept for backward
        logits = min(chunk, trained_tokens) * vocab * (act_bytes + 4) + trained_tokens * shape["hidden"] * act_bytes
    dequant = 0
    if quant is not None:
        dequant = counts["largest_linear"] * act_bytes  # one weight dequantized at a time
    memory = {
        "weights": int(weights),
        "gradients": int(gradients),
        "optimizer": int(optimizer),
        "activations": int(activations),
        "logits": int(logits),
        "dequantization": int(dequant),
    }
    peak = sum(memory.values())
    per_gpu = None
    if processes > 1 or recipe.distributed.strategy != "ddp":
        packed = counts["linear_frozen"] * NF4_BYTES[quant.double_quant] if quant is not None else 0
        per_gpu = _per_gpu(recipe, counts, memory, packed, shape["layers"], processes, gpus_per_node, mixed, spec)

    flops, executed = flops_per_token(counts, shape, recipe, length)
    tokens_per_s = utilisation * spec.bf16_tflops * 1e12 / executed if spec.bf16_tflops else None
    mfu = tokens_per_s * flops / (spec.bf16_tflops * 1e12) if tokens_per_s else None
    steps = _steps(recipe, n_examples, processes)
    wall_s = steps * recipe.train.grad_accum * tokens / tokens_per_s if steps and tokens_per_s else None

    notes = [
        f"tokens/s assume {utilisation:.0%} of the {spec.name}'s {spec.bf16_tflops:g} TFLOP/s on executed FLOPs",
        "memory is what PyTorch allocates; the CUDA context and fragmentation need ~1 GiB more",
        f"activations assume full {length}-token rows (packed or longest-in-batch)",
    ]
    if recipe.train.optimizer.startswith("paged"):
        notes.append("paged optimizer states may move to CPU memory under pressure")
    notes.append(f"trained weights ({trained['choice']}): {trained['explained']} per parameter")
    if recipe.data.packing or chunk is not None:
        notes.append("logits: only positions with a label are computed; completion-only training needs less")
    if processes > 1:
        notes.append(
            f"{processes} processes: tokens/s and MFU are per GPU; the wall time assumes linear scaling "
            "(no communication cost)"
        )
    return Plan(
        model=recipe.model.name,
        method=recipe.method.name,
        gpu=spec.name,
        params_total=counts["total"],
        params_trainable=counts["trainable"],
        shape=shape,
        tokens_per_micro_step=tokens,
        memory=memory,
        peak_bytes=int(peak),
        flops_per_token=flops,
        executed_flops_per_token=executed,
        utilisation=utilisation,
        tokens_per_s=tokens_per_s,
        mfu=mfu,
        steps=steps,
        wall_s=wall_s,
        fits=(per_gpu["peak_bytes"] if per_gpu else peak) + DEVICE_RESERVE_BYTES <= spec.memory_bytes,
        notes=notes,
        recipe_keys={
            "gradient_checkpointing": checkpointing,
            "batch_size": batch,
            "method": recipe.method.name,
            "optimizer": recipe.train.optimizer,
            "strategy": recipe.distributed.strategy,
            "zero_stage": recipe.distributed.zero_stage,
            "offload": recipe.distributed.offload,
        },
        processes=processes,
        per_gpu=per_gpu,
        trained_bytes_per_param=trained,
    )


def _per_gpu(
    recipe: Recipe,
    counts: dict,
    memory: dict[str, int],
    packed: float,
    layers: int,
    processes: int,
    gpus_per_node: int | None,
    mixed: bool,
    spec: Gpu,
) -> dict[str, Any]:
    """Per-GPU memory of `memory` (the one-GPU breakdown) under `recipe.distributed` with N processes.

    DeepSpeed with 16-bit mixed precision holds 2 B weights (not the 4-bit packed ones),
    2 B gradients and 4 B master weight + the optimizer's states in fp32 per trainable
    parameter. Sharded weights (ZeRO-3, fsdp) are gathered one unit at a time, with the next
    one prefetched: 2 × (sharded weights / layers) on top of each process's shard.
    """
    d = recipe.distributed
    weights, gradients, optimizer = memory["weights"], memory["gradients"], memory["optimizer"]
    if d.strategy == "deepspeed" and mixed:
        trainable = counts["trainable"]
        in_16_bits = counts["total"] - (counts["linear_frozen"] if packed else 0)
        weights = packed + in_16_bits * 2
        gradients = trainable * 2
        optimizer = trainable * (4 + _optimizer_bytes(recipe.train.optimizer, 4))
    state = sharded_state_bytes(
        weights - packed,
        gradients,
        optimizer,
        d.strategy,
        processes,
        zero_stage=d.zero_stage,
        offload=d.offload,
        sharding=d.sharding,
        gpus_per_node=gpus_per_node,
    )
    weights_split = d.strategy == "fsdp" or (d.strategy == "deepspeed" and d.zero_stage == 3)
    gathered = 2 * (weights - packed) / max(1, layers) if weights_split and processes > 1 else 0
    breakdown = {
        "weights": int(state.weights + packed),
        "gradients": int(state.gradients),
        "optimizer": int(state.optimizer),
        "gathered": int(gathered),
        "activations": memory["activations"],
        "logits": memory["logits"],
        "dequantization": memory["dequantization"],
    }
    peak = sum(breakdown.values())
    return {
        "strategy": describe_strategy(recipe),
        "memory": breakdown,
        "cpu_offload_bytes": int(state.cpu),
        "peak_bytes": int(peak),
        "fits": peak + DEVICE_RESERVE_BYTES <= spec.memory_bytes,
    }


@dataclass(frozen=True)
class StateBytes:
    """Bytes of training state per process: on the GPU, and moved to CPU RAM by offload."""

    weights: float
    gradients: float
    optimizer: float
    cpu: float = 0.0

    @property
    def gpu(self) -> float:
        return self.weights + self.gradients + self.optimizer


def sharded_state_bytes(
    weights: float,
    gradients: float,
    optimizer: float,
    strategy: str,
    n_gpus: int,
    zero_stage: int = 2,
    offload: str = "none",
    sharding: str = "full",
    gpus_per_node: int | None = None,
) -> StateBytes:
    """Per-GPU bytes of weights, gradients and optimizer state when N GPUs share the work.

    Inputs are the one-GPU totals (frozen weights count in `weights` only). ZeRO
    (Rajbhandari et al., 2020, fig. 1): mixed-precision Adam on Ψ parameters holds 2Ψ
    16-bit weights + 2Ψ 16-bit gradients + KΨ optimizer state (K = 12: fp32 master
    weights, momentum, variance); over N data-parallel GPUs, per GPU

        ddp            2Ψ + 2Ψ + KΨ                 (replicated)
        ZeRO-1 (P_os)  2Ψ + 2Ψ + KΨ/N
        ZeRO-2 (+g)    2Ψ + (2 + K)Ψ/N
        ZeRO-3 (+p)    (2 + 2 + K)Ψ/N
        fsdp full      as ZeRO-3; hybrid: N = GPUs per node (replicated across nodes)

    e.g. Ψ = 7.5B, N = 64: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB. Offload moves the optimizer
    state (`optimizer`), or weights and optimizer state (`params`; fsdp moves the
    gradients too), per process, to CPU RAM. Activations are not state and are not split.
    """
    n = max(1, n_gpus)
    if strategy == "fsdp":
        n = min(n, gpus_per_node or n) if sharding == "hybrid" else n
        split = (True, True, True)
    elif strategy == "deepspeed":
        split = (zero_stage >= 3, zero_stage >= 2, zero_stage >= 1)
    else:
        split = (False, False, False)
    w, g, o = (v / n if is_split else v for v, is_split in zip((weights, gradients, optimizer), split, strict=True))
    cpu = 0.0
    if offload in ("optimizer", "params"):
        cpu, o = cpu + o, 0.0
    if offload == "params":
        cpu, w = cpu + w, 0.0
        if strategy == "fsdp":
            cpu, g = cpu + g, 0.0
    return StateBytes(weights=w, gradients=g, optimizer=o, cpu=cpu)


def describe_strategy(recipe: Recipe) -> str:
    """'deepspeed ZeRO-3, offload optimizer' / 'fsdp hybrid' / 'ddp' for the plan's header."""
    d = recipe.distributed
    words = {"ddp": "ddp", "fsdp": f"fsdp {d.sharding}", "deepspeed": f"deepspeed ZeRO-{d.zero_stage}"}[d.strategy]
    return words + (f", offload {d.offload}" if d.offload != "none" else "")


def layer_activation_bytes(shape: dict[str, int], act_bytes: int, recipe: Recipe, adapted_inputs: int) -> int:
    """Bytes one decoder layer keeps for backward, per token (Llama-style block, SDPA/flash).

    Each RMSNorm keeps its fp32 input copy and its 16-bit output (4h + s·h); attention keeps
    q and k after RoPE, v and the output (s·(2h + 2kv)); the SwiGLU MLP keeps gate, up,
    silu(gate) and their product (4·s·i). LoRA with dropout > 0 keeps, per adapted module,
    the dropped copy of its input and the mask (s + 1 bytes per input feature).
    """
    h, i, kv, s = shape["hidden"], shape["intermediate"], shape["kv_dim"], act_bytes
    norms = 2 * (4 * h + s * h)
    attention = s * (2 * h + 2 * kv)
    mlp = 4 * s * i
    dropout = getattr(recipe.method, "dropout", 0.0) or 0.0
    lora_dropout = (s + 1) * adapted_inputs if dropout > 0 else 0
    return norms + attention + mlp + lora_dropout


def flops_per_token(counts: dict, shape: dict, recipe: Recipe, length: int) -> tuple[float, float]:
    """(model FLOPs, executed FLOPs) per trained token: the MFU basis, and with recomputation."""
    n_matmul = counts["matmul"]
    n_train = counts["matmul_trainable"]
    attention_fwd = 2 * shape["layers"] * length * shape["attn_dim"]  # QKᵀ and AV, causal half, ×2 FLOPs
    forward = 2 * n_matmul + attention_fwd
    backward = 2 * n_matmul + 2 * n_train + 2 * attention_fwd
    model = forward + backward
    executed = model + (forward if recipe.model.gradient_checkpointing else 0)
    return float(model), float(executed)


def memory_warning(recipe: Recipe, capacity_bytes: int, gpu: str | None = None) -> str | None:
    """The warning `ftkit train` prints before loading weights, or None when the plan fits.

    Fits means: planned peak + ~1 GiB (CUDA context, fragmentation) <= the device's memory;
    the per-GPU peak when the launcher started several processes (WORLD_SIZE).
    A model whose config cannot be read gives a note instead: a plan is advice, never a gate.
    """
    try:
        plan = estimate(recipe, gpu, processes=world_size())
    except Exception as err:  # a method the planner cannot build on the meta device, an unreadable config
        return f"note: no memory plan ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    peak = plan.per_gpu["peak_bytes"] if plan.per_gpu else plan.peak_bytes
    if peak + DEVICE_RESERVE_BYTES <= capacity_bytes:
        return None
    return (
        f"warning: ftkit plan expects {peak / GIB:.1f} GiB at peak (+~1 GiB CUDA context); "
        f"this GPU has {capacity_bytes / GIB:.1f} GiB. {plan.advice()}"
    )


def mfu(recipe: Recipe, tokens_per_s: float, device: Any) -> float | None:
    """Model FLOPs utilisation of a finished run on a known CUDA GPU (None elsewhere or if unknown)."""
    try:
        if getattr(device, "type", None) != "cuda":
            return None
        spec = _detect_gpu()
        if spec is None:
            return None
        plan = estimate(recipe, spec.name)
        return tokens_per_s * plan.flops_per_token / (spec.bf16_tflops * 1e12)
    except Exception:  # a figure for the summary must never fail a finished run
        return None


# ---------------------------------------------------------------- the model, on the meta device


def load_config(recipe: Recipe) -> Any:
    """The model's transformers config (no weights): built-in, packaged or GGUF, local folder, adapter's base, hub."""
    return load_model_config(recipe.model)


def _meta_model(config: Any, recipe: Recipe) -> Any:
    # the method decides what trains; inside the meta context peft builds (and "initialises")
    # its adapters without memory or compute too
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
        model = skeleton(config, recipe.model.trust_remote_code)
        return get_method(recipe.method.name).apply(model, recipe.method)


def _parameter_counts(model: Any, config: Any) -> dict[str, Any]:
    """Totals by role: all, trainable, matmul weights (linear layers incl. the head), frozen
    linear weights (what 4-bit quantizes) and the largest of them, input features feeding
    adapters (all layers)."""
    total = trainable = matmul = matmul_trainable = linear_frozen = largest = adapted_inputs = 0
    head = model.get_output_embeddings()
    seen = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    head_names = [name for name, module in model.named_modules() if head is not None and module is head]
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        n = module.weight.numel()
        matmul += n
        in_head = any(name == h or name.startswith(h + ".") for h in head_names)
        if module.weight.requires_grad:
            matmul_trainable += n
        elif not in_head and "lora_" not in name:
            linear_frozen += n  # what 4-bit loading quantizes (never the head)
            largest = max(largest, n)
        if name.endswith("lora_A.default"):
            adapted_inputs += module.in_features
    return {
        "total": total,
        "trainable": trainable,
        "matmul": matmul,
        "matmul_trainable": matmul_trainable,
        "linear_frozen": linear_frozen,
        "largest_linear": largest,
        "adapted_inputs": adapted_inputs,
    }


def _shape(config: Any) -> dict[str, int]:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return {
        "layers": config.num_hidden_layers,
        "hidden": hidden,
        "intermediate": getattr(config, "intermediate_size", 4 * hidden),
        "heads": heads,
        "kv_heads": kv_heads,
        "attn_dim": heads * head_dim,
        "kv_dim": kv_heads * head_dim,
        "vocab": config.vocab_size,
    }


def _weight_bytes(dtype: str, spec: Gpu) -> int:
    if dtype == "auto":  # as ftkit.models.load.resolve_dtype on this GPU
        return 2 if spec.has_bf16 else 4
    return 4 if dtype == "float32" else 2


def trained_bytes_per_param(choice: str, dtype_bytes: int, optimizer: str) -> dict[str, Any]:
    """Bytes each trained parameter holds, by `train.master_weights` (ftkit.train.precision):

    weights 4 B (fp32):  4 weight + 4 gradient + optimizer states in fp32 (whatever the choice)
    16-bit, fp32         4 master + 2 bf16 copy autocast makes for the matmuls, 4 gradient, states in fp32
    16-bit, kahan        2 weight + 2 compensation, 2 gradient, AdamW's moments in fp32 (8)
    16-bit, none         2 weight, 2 gradient, states in the weight's dtype (torch AdamW: 4)
    """
    if dtype_bytes == 4:
        choice, weights, gradients, states = "float32 model", 4.0, 4.0, _optimizer_bytes(optimizer, 4)
        explained = f"4 weight + 4 gradient + {states:g} {optimizer}"
    elif choice == "fp32":
        weights, gradients, states = 6.0, 4.0, _optimizer_bytes(optimizer, 4)
        explained = f"4 fp32 master + 2 16-bit copy + 4 gradient + {states:g} {optimizer}"
    elif choice == "kahan":
        weights, gradients, states = 4.0, 2.0, 8.0
        explained = "2 weight + 2 compensation + 2 gradient + 8 AdamW (fp32 moments)"
    else:
        weights, gradients, states = 2.0, 2.0, _optimizer_bytes(optimizer, 2)
        explained = f"2 weight + 2 gradient + {states:g} {optimizer}"
    total = weights + gradients + states
    return {
        "choice": f"master_weights {choice}" if dtype_bytes == 2 else choice,
        "weights": weights,
        "gradients": gradients,
        "optimizer": states,
        "total": total,
        "explained": f"{explained} = {total:g} B",
    }


def _optimizer_bytes(name: str, param_bytes: int) -> float:
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        return OPTIMIZER_BYTES_8BIT
    if name == "paged_adamw_32bit":
        return 8
    return 2 * param_bytes  # torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype


def _steps(recipe: Recipe, n_examples: int | None, processes: int = 1) -> int | None:
    """Optimizer steps: an epoch is ceil(examples / (batch_size × grad_accum × N)) steps (ftkit.train.loop)."""
    cfg = recipe.train
    if cfg.max_steps is not None:
        return cfg.max_steps
    if n_examples is None:
        return None
    return max(1, math.ceil(cfg.epochs * math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum * processes))))


def _gpu(name: str | None) -> Gpu:
    if name is None:
        return _detect_gpu() or GPUS[DEFAULT_GPU]
    key = name.lower()
    if key not in GPUS:
        raise PlanError(f"--gpu: unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


def _detect_gpu() -> Gpu | None:
    """This machine's GPU as a GPUS entry, matched by name and memory; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower().replace(" ", "")
    memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    for key in ("h200", "h100", "a100", "l40s", "a6000", "l4", "4090", "3090", "a10", "t4"):
        if key in name:
            candidates = [g for g in GPUS.values() if g.name.startswith(key)]
            if key == "h100" and "pcie" in name:
                candidates = [GPUS["h100-pcie"]]
            return min(candidates, key=lambda g: abs(g.memory_bytes - memory))
    return None


# ---------------------------------------------------------------- output


#: wide enough that no row wraps (model paths are long); the notes are printed unwrapped
TABLE_WIDTH = 200


def render_table(plan: Plan) -> str:
    """The plan for people (written to stderr): a header line, a table of counts and speed, a table
    of memory (the one-GPU figure beside the per-GPU one under the recipe's distributed section),
    the notes and, when it does not fit, the advice. Plain text: no colour, no wrapped rows."""
    console = Console(file=io.StringIO(), width=TABLE_WIDTH, color_system=None, markup=False, emoji=False)
    console.print(f"plan · {plan.model} · {plan.method} · {plan.gpu}", soft_wrap=True, highlight=False)
    console.print(Padding(_figures_table(plan), (0, 0, 0, 2), expand=False), highlight=False)
    console.print(Padding(_memory_table(plan), (0, 0, 0, 2), expand=False), highlight=False)
    lines = [f"note: {note}" for note in plan.notes] + ([] if plan.fits else [plan.advice()])
    for line in lines:
        console.print("  " + line, soft_wrap=True, highlight=False)
    return "".join(line.rstrip() + "\n" for line in console.file.getvalue().splitlines())  # cells pad to width


def _figures_table(plan: Plan) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column()
    table.add_column(justify="right")
    table.add_column()
    pct = 100 * plan.params_trainable / max(plan.params_total, 1)
    table.add_row("parameters", f"{plan.params_total:,}", "")
    table.add_row("trainable", f"{plan.params_trainable:,}", f"({pct:.2f}%)")
    table.add_row("tokens/micro-step", f"{plan.tokens_per_micro_step:,}", "")
    table.add_row("FLOPs/token", f"{plan.flops_per_token:.3e}", f"(executed {plan.executed_flops_per_token:.3e})")
    if plan.tokens_per_s:
        table.add_row("tokens/s", f"{plan.tokens_per_s:,.0f}", f"(MFU {plan.mfu:.0%})")
    if plan.wall_s:
        table.add_row("wall time", _duration(plan.wall_s), f"({plan.steps} steps)")
    return table


def _memory_table(plan: Plan) -> Table:
    """Rows of the memory breakdown that are not zero, then the peak (and CPU RAM under offload);
    one column for one GPU, or the one-GPU column beside the per-GPU one."""
    split = plan.per_gpu
    breakdowns = [plan.memory] if split is None else [plan.memory, split["memory"]]
    peaks = [plan.peak_bytes] if split is None else [plan.peak_bytes, split["peak_bytes"]]
    table = Table(box=None, pad_edge=False, header_style="")
    table.add_column("memory")
    for header in [""] if split is None else ["one GPU", "per GPU"]:
        table.add_column(header, justify="right")
    table.add_column("" if split is None else f"({plan.processes} × {split['strategy']})")
    for key in dict.fromkeys(key for breakdown in breakdowns for key in breakdown):
        values = [breakdown.get(key, 0) for breakdown in breakdowns]
        if any(values):
            table.add_row(key, *map(_gib, values), "")
    table.add_row("peak", *map(_gib, peaks), f"({'fits' if plan.fits else 'does NOT fit'} {plan.gpu})")
    if split is not None and split["cpu_offload_bytes"]:
        table.add_row("CPU RAM", "", _gib(split["cpu_offload_bytes"]), "(offloaded, per process)")
    return table


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB"


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def to_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2) + "\n"
