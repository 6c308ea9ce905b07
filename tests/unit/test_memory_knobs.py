"""Memory and speed knobs change cost, never the maths: same gradients with activation
checkpointing (and with its CPU offload), same loss compiled; knobs that cannot run here
are refused naming their key, before anything is written."""

from __future__ import annotations

import copy

import pytest
import torch

from ftkit.data import collate
from ftkit.data.packing import pack_examples
from ftkit.methods import get_method
from ftkit.models.load import build_model, compile_layers
from ftkit.recipe.methods import LoraConfig
from ftkit.recipe.schema import ModelSection
from ftkit.tasks.losses import CausalLMLoss
from tests.unit.test_loop import random_examples


@pytest.fixture(scope="module")
def base():
    model, tokenizer, _ = build_model(ModelSection(name="builtin:micro-llama"), "cpu", seed=0)
    return model, tokenizer


def lora(model):
    torch.manual_seed(0)
    model = get_method("lora").apply(copy.deepcopy(model), LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.train()


def grads(model, loss_fn, batch):
    loss = loss_fn(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("mode, packed", [(True, False), ("offload", True)], ids=["padded", "offload-packed"])
def test_checkpointing_gives_equal_gradients(base, mode, packed):
    examples = random_examples(8, seed=3, vocab=262)
    if packed:
        examples, _ = pack_examples(examples, max_length=64, seed=0)
    batch = collate(examples, base[1].pad_token_id)
    plain = lora(base[0])
    checkpointed = lora(base[0])
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    want_loss, want = grads(plain, CausalLMLoss(), batch)
    got_loss, got = grads(checkpointed, CausalLMLoss(offload_activations=mode == "offload"), batch)
    assert checkpointed.is_gradient_checkpointing
    # recomputation repeats the same fp32 ops in the same order: equal up to summation order
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=0)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


@pytest.mark.slow  # inductor compiles the layer in ~2 minutes on 2 shared cores
def test_compiled_layers_give_equal_loss(base):
    batch = collate(random_examples(4, seed=1, vocab=262), base[1].pad_token_id)
    eager = lora(base[0])
    compiled = lora(base[0])
    assert compile_layers(compiled) == 2
    want_loss, want = grads(eager, CausalLMLoss(), batch)
    got_loss, got = grads(compiled, CausalLMLoss(), batch)
    # inductor fuses and reorders fp32 reductions: rounding-level differences only
    torch.testing.assert_close(got_loss, want_loss, atol=1e-3, rtol=1e-5)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
def test_offload_lowers_peak_cuda_memory(base):
    """On a GPU, offload keeps each layer's checkpointed input in CPU memory."""
    batch = {k: v.cuda() for k, v in collate(random_examples(8, seed=3, vocab=262), base[1].pad_token_id).items()}
    peaks = {}
    for mode in (True, "offload"):
        model = lora(base[0]).cuda()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        grads(model, CausalLMLoss(offload_activations=mode == "offload"), batch)
        peaks[mode] = torch.cuda.max_memory_allocated() - start
    assert peaks["offload"] < peaks[True]


@pytest.mark.gpu
def test_liger_fused_loss_equals_chunked(base):
    pytest.importorskip("liger_kernel")
    batch = {k: v.cuda() for k, v in collate(random_examples(6, seed=4, vocab=262), base[1].pad_token_id).items()}
    model = lora(base[0]).cuda()
    want_loss, want = grads(model, CausalLMLoss(), batch)
    got_loss, got = grads(model, CausalLMLoss(kernels="liger"), batch)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-3, rtol=1e-5)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
def test_flash_attention_packed_equals_sdpa_packed():
    """flash-attention's varlen path (rows flattened, sequences from position ids) = SDPA's block mask."""
    pytest.importorskip("flash_attn")
    rows, _ = pack_examples(random_examples(12, seed=5, vocab=262), max_length=96, seed=0)
    batch = {k: v.cuda() for k, v in collate(rows, 0).items()}
    losses = {}
    for attn in ("sdpa", "flash_attention_2"):
        cfg = ModelSection(name="builtin:micro-llama", attn_implementation=attn, dtype="bfloat16")
        model = build_model(cfg, "cuda", seed=0)[0].cuda()
        with torch.no_grad():
            losses[attn] = CausalLMLoss(flatten_packed=attn == "flash_attention_2")(model, batch)
    torch.testing.assert_close(losses["flash_attention_2"], losses["sdpa"], rtol=2e-2, atol=0)
