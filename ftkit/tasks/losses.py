"""The causal-LM loss without full fp32 logits, and the model inputs of a batch.

For Llama-3.1-8B a 2048-token row has 2048 × 128,256 logits: 0.5 GiB in bf16, another
1 GiB for the fp32 copy cross-entropy wants, and 1 GiB more for the softmax autograd
keeps for backward, per row. `chunked_cross_entropy_sum` never holds more than
`chunk_size` rows of logits: for each chunk it computes the loss *and* its gradients
with respect to the hidden states and the head (d loss / d logits = softmax − onehot is
known in the forward pass), keeps only those gradients (N × H and V × H), and frees the
logits. Only positions that carry a label are computed at all, so completion-only
training skips the prompt's logits entirely.

`CausalLMLoss` feeds it: it runs the model's decoder (its public `get_decoder()`), takes
the head from `get_output_embeddings()`, and falls back to the model's own logits when
that would not reproduce them (post-head transforms such as logit soft-capping, a
LoRA-adapted head, prompt-learning adapters, a distributed wrapper).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Any

import torch
import torch.nn.functional as F
from peft.utils import ModulesToSaveWrapper

from ftkit.errors import ModelError
from ftkit.io import messages

IGNORE = -100

#: config attributes of models whose logits are not just `lm_head(hidden)`
_POST_HEAD_CONFIG_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class _LinearCrossEntropySum(torch.autograd.Function):
    """Σ_rows −log softmax(h Wᵀ + b)[y], chunk by chunk, with gradients computed in the forward.

    For one row: loss = logsumexp(z) − z_y with z = h Wᵀ + b, so
        ∂loss/∂z = softmax(z) − onehot(y) =: g,   ∂loss/∂h = g W,   ∂loss/∂W = gᵀ h,   ∂loss/∂b = g.
    Logits are computed in `dtype` (the matmul precision the model's head would use) and
    the softmax in fp32, as `F.cross_entropy(logits.float())` does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, dtype: torch.dtype):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        acc = torch.promote_types(dtype, torch.float32)  # softmax precision: fp32, or fp64 if given fp64
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(dtype)
            y = labels[start : start + chunk_size]
            logits = (h @ w.T).to(acc)
            if bias is not None:
                logits += bias.to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            # softmax − onehot, in place over the logits buffer
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(y), device=g.device), y] -= 1.0
            if need_b:
                grad_b += g.sum(0).to(grad_b.dtype)
            g = g.to(dtype)
            if need_h:
                grad_h[start : start + chunk_size] = (g @ w).to(grad_h.dtype)
            if need_w:
                grad_w.addmm_(g.T.to(grad_w.dtype), h.to(grad_w.dtype))
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.needs = (need_h, need_w, need_b)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = []
        for need in ctx.needs:
            grad = next(saved) if need else None
            # in place: the buffers are ours alone and are used once (no retain_graph in ftkit)
            grads.append(None if grad is None else grad.mul_(grad_out.to(grad.dtype)))
        return grads[0], grads[1], grads[2], None, None, None


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 256,
    ignore_index: int = IGNORE,
) -> torch.Tensor:
    """Σ over positions with a label of −log softmax(hidden Wᵀ + b)[label], as one fp32 (or fp64) scalar.

    hidden: (N, H) final hidden states, already aligned with `labels` (N,) (the caller
    shifts). Equals `F.cross_entropy(F.linear(hidden, W, b).float(), labels, reduction="sum",
    ignore_index=...)` (tested to 1e-6), but holds at most `chunk_size` × V logits at a time.
    Under autocast the logits are computed in the autocast dtype, as the head would.
    """
    keep = labels != ignore_index
    hidden, labels = hidden[keep], labels[keep]
    if not torch.is_grad_enabled():  # evaluation: no gradient buffers (a trainable head still says requires_grad)
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropySum.apply(hidden, weight, bias, labels, chunk_size, dtype)


def model_inputs(batch: dict[str, torch.Tensor], flatten_packed: bool = False) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's forward for a collated batch (labels excluded).

    A padded batch passes its 2-D attention mask. A packed batch passes `position_ids` and
    *no* attention mask: transformers then keeps attention inside each packed sequence
    (see ftkit.data.packing). flash-attention detects packed sequences only in a batch of
    one row, so with `flatten_packed` the rows are laid end to end as one; every row starts
    with a sequence start, so this joins nothing.
    """
    # use_cache=False always: a loss needs no KV cache (it would only hold memory), and with a
    # cache transformers stops looking for packed sequences and would attend across them
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    if flatten_packed:
        input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
    return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}


@dataclass
class CausalLMLoss:
    """Summed next-token cross-entropy of a batch: Σ_{t: label_{t+1} ≠ −100} −log p(label_{t+1} | x_≤t).

    chunk_size: rows of logits computed at once (None: the model's full logits, as before).
    kernels: "liger" uses Liger's fused linear cross-entropy instead of ftkit's own (CUDA).
    offload_activations: keep tensors saved for backward in pinned CPU memory
        (`torch.autograd.graph.save_on_cpu`); with gradient checkpointing these are only
        each layer's input, so GPU activation memory no longer grows with the layer count.
    flatten_packed: lay packed rows end to end (flash-attention's varlen path).
    """

    chunk_size: int | None = 256
    kernels: str = "none"
    offload_activations: bool = False
    flatten_packed: bool = False
    #: why the chunked path is off for a model (None: it is on), decided once per model
    fallback_reason: dict[int, str | None] = field(default_factory=dict, repr=False)

    @classmethod
    def from_recipe(cls, recipe: Any) -> CausalLMLoss:
        """The loss a recipe asks for (perf.*, model.gradient_checkpointing, model.attn_implementation)."""
        return cls(
            chunk_size=recipe.perf.loss_chunk_size,
            kernels=recipe.perf.kernels,
            offload_activations=recipe.model.gradient_checkpointing == "offload",
            flatten_packed=recipe.model.attn_implementation == "flash_attention_2",
        )

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = model_inputs(batch, self.flatten_packed)
        labels = batch["labels"].reshape(inputs["input_ids"].shape)
        context = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
        with context if self.offload_activations else contextlib.nullcontext():
            if self.chunk_size is None or self.reason_for_logits(model, inputs) is not None:
                return self._from_logits(model, inputs, labels)
            return self._chunked(model, inputs, labels)

    def reason_for_logits(self, model: Any, inputs: dict[str, torch.Tensor]) -> str | None:
        """Why the loss must come from the model's logits for this model, or None (decided once)."""
        key = id(model)
        if key not in self.fallback_reason:
            reason = _why_not_chunked(model) or _probe(model, inputs)
            if reason is not None:
                print(f"note: loss computed from the model's full logits: {reason}", file=messages())
            self.fallback_reason[key] = reason
        return self.fallback_reason[key]

    def _from_logits(self, model: Any, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        # prompt-learning adapters prepend virtual tokens: the last T positions are the input's
        logits = model(**inputs).logits[:, -inputs["input_ids"].shape[1] :, :][:, :-1, :]
        labels = labels[:, 1:]
        keep = labels != IGNORE  # only positions in the loss are upcast to fp32
        return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")

    def _chunked(self, model: Any, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        base = _base(model)
        hidden = base.get_decoder()(**inputs).last_hidden_state[:, :-1, :]
        labels = labels[:, 1:]
        head = _linear_head(base)
        hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        if self.kernels == "liger":
            # liger-kernel is optional (CUDA only; check_kernels refused it up front when absent)
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
            return fused(head.weight, hidden, labels, head.bias)
        return chunked_cross_entropy_sum(hidden, head.weight, labels, head.bias, self.chunk_size)


def check_kernels(kernels: str, device_type: str) -> None:
    """ModelError naming perf.kernels when the asked-for kernels cannot run here."""
    if kernels != "liger":
        return
    if device_type != "cuda" or find_spec("liger_kernel") is None:
        raise ModelError(
            "perf.kernels: liger needs a CUDA GPU and the liger-kernel package (pip install liger-kernel); "
            "use none (ftkit's own chunked loss), which needs neither"
        )


def _base(model: Any) -> Any:
    """The transformers model inside a peft wrapper (adapters stay injected in its layers)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _linear_head(base: Any) -> Any:
    """The module whose weight maps hidden states to logits: lm_head, or the copy peft trains
    when lm_head is in `modules_to_save`; None when it is anything else (e.g. LoRA-adapted)."""
    head = base.get_output_embeddings()
    if isinstance(head, ModulesToSaveWrapper):
        active = head.active_adapters
        if head.disable_adapters or not active:
            head = head.original_module
        elif len(active) == 1 and active[0] in head.modules_to_save:
            head = head.modules_to_save[active[0]]
        else:
            return None
    return head if type(head) is torch.nn.Linear else None


def _why_not_chunked(model: Any) -> str | None:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return "distributed wrapper: its forward must run"
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return "prompt-learning adapters act in the wrapper's forward"
    base = _base(model)
    if not (hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings")):
        return "no decoder / output embeddings to split the model at"
    if _linear_head(base) is None:
        return f"the output head is a {type(base.get_output_embeddings()).__name__}, not a plain linear layer"
    config = getattr(base, "config", None)
    for key in _POST_HEAD_CONFIG_KEYS:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0, False):
            return f"config.{key} transforms the logits after the head"
    return None


@torch.no_grad()
def _probe(model: Any, inputs: dict[str, torch.Tensor]) -> str | None:
    """Check on a few tokens that head(decoder(x)) reproduces model(x).logits; the reason if not.

    Runs in the model's current (training) mode: switching to eval mode is not free of side
    effects (bitsandbytes repacks 4-bit weights for CPU inference on an eval forward). Both
    passes draw the same dropout masks from one seed, inside a forked RNG, so the probe
    leaves the random state of the run untouched (resumed runs replay exactly).
    """
    probe = {key: value[:1, :16] if torch.is_tensor(value) else value for key, value in inputs.items()}
    device = probe["input_ids"].device
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            expected = model(**probe).logits.float()
            base = _base(model)
            head = _linear_head(base)
            torch.manual_seed(0)
            hidden = base.get_decoder()(**probe).last_hidden_state
            got = F.linear(hidden.to(head.weight.dtype), head.weight, head.bias).float()
    except Exception as err:  # any failure here means "use the model's own logits"
        return f"the decoder cannot be run on its own ({type(err).__name__}: {err})"
    # fp32 matmuls agree to rounding; bf16/fp16 ones (autocast or 16-bit weights) to a few ulps
    exact = head.weight.dtype == torch.float32 and not torch.is_autocast_enabled(device.type)
    tolerance = 1e-4 if exact else 3e-2
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=tolerance, atol=tolerance):
        return "head(decoder(x)) differs from the model's logits"
    return None
