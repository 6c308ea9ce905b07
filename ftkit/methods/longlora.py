"""LongLoRA (Chen et al. 2023, "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models").

Three parts, each optional to the maths of the others:

1. LoRA on the attention projections, plus the input embeddings and every normalization
   layer trained in full (the paper's "LoRA+": without them LoRA does not learn a longer
   context). They go through peft's `modules_to_save`, so final/ is an ordinary peft adapter
   holding the trained copies, `merge_and_unload` folds everything into the base, and a
   model with tied embeddings keeps them tied (`ensure_weight_tying`).

2. Shifted sparse attention (S²-Attn) in training. With G = group_size_ratio × data.max_length
   (the paper's 1/4 of the training length, rounded down to an even number), the T positions
   of a row are cut into groups and every head attends causally inside its group only:

       heads [0, H/2)   groups [kG, (k+1)G)
       heads [H/2, H)   groups shifted by G/2: [0, G/2), [G/2, 3G/2), [3G/2, 5G/2), ...

   A query sees at most G keys, so attention costs O(T·G) instead of O(T²), and the shifted
   half carries information across the boundaries of the other half's groups. A row of at
   most G tokens is one group: it gets full causal attention (the shift would only cut it).
   The paper's code rolls the shifted heads by G/2 *with wrap-around*, so its last group puts
   the first G/2 tokens after the last ones, where they see keys from the end of the row.
   Here the shifted half is padded by G/2 at the front instead, and rows whose length is not
   a multiple of G are padded at the end; pad keys are masked, so no token ever sees a later one.

   Masks: the function is registered with transformers' `sdpa_mask` (AttentionMaskInterface),
   so it receives exactly the 4-D boolean mask sdpa would (causal, padding, the block-diagonal
   mask of packed rows, sliding windows) and keeps that mask's diagonal G × G blocks: S²-Attn
   attends to a subset of what full attention would, never to more.

3. Position interpolation (Chen et al. 2023b), optional: `rope_scaling_factor` s sets linear
   RoPE scaling (position p rotates as p / s) in the model config before the weights load, so
   a model trained on L tokens reads s·L. The run writes that config into its base/, which
   final/'s adapter_config points to: `PeftModel.from_pretrained(base/, final/)` is the trained model.

Train vs inference: the registered attention function runs S²-Attn when the attention module is
in training mode and transformers' own sdpa otherwise. The loop already puts the model in
train mode for its steps and in eval mode for evaluation and generation, so evaluation during
training, `ftkit eval`, `generate` and the samples in report.md all use full attention, and the
saved model (base config + adapter) carries no trace of S²-Attn: a new process loads it with sdpa.
The switch is transformers' public `set_attn_implementation`, done in `hooks` (a run only):
`apply` marks what trains and stays usable outside a run (`ftkit plan`, tests).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ftkit.errors import ModelError
from ftkit.methods import lora
from ftkit.methods.base import MethodHooks, RunInfo
from ftkit.recipe.methods import LongloraConfig

#: prefix of the attention implementations registered here; the group size completes the name
ATTN_PREFIX = "ftkit_s2_attn_g"


# ---------------------------------------------------------------- what trains


def trained_module_names(model: Any, config: LongloraConfig) -> list[str]:
    """Leaf names of the modules trained in full: the input embeddings and every normalization
    layer (a module whose class name ends in "Norm": LlamaRMSNorm, LayerNorm, ...)."""
    names: list[str] = []
    if config.trainable_embeddings:
        embeddings = model.get_input_embeddings()
        names.append(next(name for name, module in model.named_modules() if module is embeddings).rsplit(".", 1)[-1])
    if config.trainable_norms:
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            has_weights = any(True for _ in module.parameters(recurse=False))
            if type(module).__name__.endswith("Norm") and has_weights and leaf not in names:
                names.append(leaf)
    return names


run_problems = lora.run_problems  # the same adapters: the same targets and init checks


def apply(model: Any, config: LongloraConfig, run: RunInfo) -> Any:
    saved = list(config.modules_to_save or [])
    saved += [name for name in trained_module_names(model, config) if name not in saved]
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    # a tied head must follow the trained embedding copy, or merging would untie them (peft #2777)
    extra = {"ensure_weight_tying": True} if tied and config.trainable_embeddings else {}
    return lora.apply(model, config.model_copy(update={"modules_to_save": saved or None}), run, **extra)


# ---------------------------------------------------------------- before the weights load


def model_problems(config: LongloraConfig, model_config: Any) -> list[str]:
    """S²-Attn and position interpolation need a rotary (RoPE) decoder with at least two heads."""
    model_type = getattr(model_config, "model_type", "?")
    rope = getattr(model_config, "rope_parameters", None)
    if not rope:
        kind = getattr(model_config, "position_embedding_type", None) or "learned absolute"
        return [
            f"method.name: longlora extends the context of a rotary (RoPE) model; {model_type} has {kind} position "
            "embeddings, which position interpolation cannot stretch; use a RoPE model (Llama, Mistral, Qwen, ...)"
        ]
    problems = []
    heads = getattr(model_config, "num_attention_heads", None)
    if heads is not None and heads < 2:
        problems.append(
            f"method.name: longlora shifts half of the attention heads; {model_type} has {heads}; use another method"
        )
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "?"
    if config.rope_scaling_factor is not None and rope_type != "default":
        problems.append(
            f"method.rope_scaling_factor: {model_type} already scales RoPE ({rope_type}); linear interpolation on "
            "top of it is not supported: remove method.rope_scaling_factor"
        )
    return problems


def model_config_changes(config: LongloraConfig, model_config: Any) -> dict[str, Any]:
    """`rope_parameters` with linear scaling by `rope_scaling_factor` (transformers' "linear" RoPE type:
    inv_freq / s), keeping the model's theta and partial rotary factor; empty when not asked for."""
    if config.rope_scaling_factor is None:
        return {}
    rope = dict(model_config.rope_parameters)
    rope.update(rope_type="linear", factor=float(config.rope_scaling_factor))
    return {"rope_parameters": rope}


# ---------------------------------------------------------------- the run


def hooks(model: Any, config: LongloraConfig, run: RunInfo) -> MethodHooks:
    """Switch `model`'s attention to S²-Attn (training mode only; see the module docstring)."""
    if run.max_length is None:
        raise ModelError("method.group_size_ratio: longlora sizes its groups from data.max_length (RunInfo.max_length)")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(register_attention(config.group_size(run.max_length)))
    return lora.hooks(model, config, run)


def register_attention(group_size: int) -> str:
    """Register S²-Attn with groups of `group_size` in transformers' AttentionInterface (and sdpa's
    mask in its AttentionMaskInterface, under the same name); return the name."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"S²-Attn group size must be even and at least 2, got {group_size}")
    name = f"{ATTN_PREFIX}{group_size}"
    AttentionInterface.register(name, functools.partial(shifted_sparse_attention, group_size=group_size))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


# ---------------------------------------------------------------- S²-Attn


def shifted_sparse_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    group_size: int,
    **kwargs: Any,
) -> tuple[Any, None]:
    """An AttentionInterface function: S²-Attn when `module.training`, transformers' sdpa otherwise.

    query (B, H, T, D), key / value (B, H_kv, T, D) with RoPE applied; attention_mask the boolean
    (B or 1, 1, T, T) mask of `sdpa_mask` (True = may attend) or None for plain causal attention.
    Returns (B, T, H, D), as every AttentionInterface function does. Rows of at most `group_size`
    tokens, and calls with a KV cache (keys longer than queries), get full attention.
    """
    q_len = query.shape[2]
    if not module.training or q_len <= group_size or key.shape[2] != q_len:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if is_causal is False or not getattr(module, "is_causal", True):
        raise ValueError("S²-Attn is causal attention; this call asks for bidirectional attention")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise ValueError("S²-Attn takes the boolean mask of transformers' sdpa_mask, not an additive float mask")
    n_rep = getattr(module, "num_key_value_groups", 1)
    half = query.shape[1] // 2
    if attention_mask is not None or half % n_rep:
        # GQA without copies only where each half of the query heads owns whole KV heads, unmasked
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
        n_rep = 1
    kv_half = half // n_rep
    halves = ((slice(None, half), slice(None, kv_half), 0), (slice(half, None), slice(kv_half, None), group_size // 2))
    parts = [
        grouped_attention(query[:, q], key[:, kv], value[:, kv], attention_mask, group_size, s, dropout, scaling)
        for q, kv, s in halves
    ]
    return torch.cat(parts, dim=1).transpose(1, 2).contiguous(), None


def grouped_attention(
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    group_size: int,
    shift: int,
    dropout: float = 0.0,
    scaling: float | None = None,
) -> Any:
    """Causal attention of (B, h, T, D) tensors inside groups of `group_size` positions, the first
    group `group_size - shift` long: position p is in group ⌊(p + shift) / G⌋.

    The row is padded with `shift` slots in front and up to a multiple of G at the end, laid out as
    (B · n_groups, h, G, D) and sent to one sdpa call with a (B · n_groups, 1, G, G) mask: the diagonal
    blocks of `attention_mask` (None: causal), pad slots masked as keys. A pad slot keeps itself as its
    key, so no softmax row is empty (an all-masked row is NaN); no real position attends to it.
    Returns (B, h, T, D).

    Without a mask (plain causal attention, no padding: fixed-length or unpadded rows) the groups
    need none either: the first (partial) group, the full groups laid out as a batch, and the last
    (partial) one each go to sdpa with `is_causal`, which lets it pick its fused kernels that never
    hold the G × G scores (same result, less memory).
    """
    if attention_mask is None:
        return _causal_groups(query, key, value, group_size, shift, dropout, scaling)
    batch, heads, length, dim = query.shape
    groups = -(-(length + shift) // group_size)
    padded = groups * group_size
    device = query.device

    def grouped(x: Any) -> Any:
        x = F.pad(x, (0, 0, shift, padded - length - shift))
        return x.view(batch, heads, groups, group_size, dim).transpose(1, 2).reshape(-1, heads, group_size, dim)

    position = (torch.arange(padded, device=device) - shift).view(groups, group_size)  # -1 ... : front pads
    is_real = (position >= 0) & (position < length)
    if attention_mask is None:
        blocks = torch.ones(group_size, group_size, dtype=torch.bool, device=device).tril()[None, None]
    else:
        index = position.clamp(0, length - 1)
        blocks = attention_mask[:, 0][:, index[:, :, None], index[:, None, :]]  # (B or 1, n, G, G)
    blocks = blocks & is_real[:, None, :] & is_real[:, :, None]
    blocks = blocks | torch.eye(group_size, dtype=torch.bool, device=device)
    blocks = blocks.expand(batch, groups, group_size, group_size).reshape(-1, 1, group_size, group_size)
    out = F.scaled_dot_product_attention(
        grouped(query), grouped(key), grouped(value), attn_mask=blocks, dropout_p=dropout, scale=scaling
    )
    out = out.view(batch, groups, heads, group_size, dim).transpose(1, 2).reshape(batch, heads, padded, dim)
    return out[:, :, shift : shift + length]


def _causal_groups(query: Any, key: Any, value: Any, group_size: int, shift: int, dropout: float, scaling: Any) -> Any:
    """`grouped_attention` without a mask: causal sdpa on the first group (G − shift positions), on
    the full groups after it (one batch), and on the remainder. Key/value may have fewer heads than
    the query (GQA: sdpa's `enable_gqa` shares each among its query heads)."""
    batch, heads, length, dim = query.shape

    gqa = key.shape[1] != heads

    def attend(start: int, stop: int, groups: int = 1) -> Any:
        q, k, v = (x[:, :, start:stop] for x in (query, key, value))
        if groups > 1:  # (B, h, n·G, D) → (B·n, h, G, D) and back
            q, k, v = (x.unflatten(2, (groups, -1)).transpose(1, 2).flatten(0, 1) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        if groups > 1:
            out = out.view(batch, groups, heads, -1, dim).transpose(1, 2).reshape(batch, heads, -1, dim)
        return out

    first = min(group_size - shift, length)
    full = (length - first) // group_size
    cuts = [(0, first, 1), (first, first + full * group_size, full), (first + full * group_size, length, 1)]
    return torch.cat([attend(start, stop, groups) for start, stop, groups in cuts if stop > start], dim=2)
