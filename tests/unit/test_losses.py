"""Chunked cross-entropy equals F.cross_entropy (loss and gradients), and CausalLMLoss takes
the chunked path exactly when head(decoder(x)) is the model's logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ftkit.data import collate
from ftkit.methods import get_method
from ftkit.models.load import build_model
from ftkit.recipe.methods import LoraConfig
from ftkit.recipe.schema import ModelSection
from ftkit.tasks.losses import CausalLMLoss, chunked_cross_entropy_sum
from tests.unit.test_loop import random_examples


def reference(hidden, weight, labels, bias=None):
    """What SFT computed before: logits upcast to fp32 (kept in fp64 for an fp64 case)."""
    logits = F.linear(hidden, weight, bias)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)


def case(dtype, n=200, h=24, v=131, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(v, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_matches_cross_entropy_in_fp64(chunk):
    hidden, weight, bias, labels = case(torch.float64)
    want = reference(hidden, weight, labels, bias)
    got = chunked_cross_entropy_sum(hidden, weight, labels, bias, chunk_size=chunk)
    assert got.dtype == torch.float64
    assert abs(float(got - want)) < 1e-6
    params = (hidden, weight, bias)
    for a, b in zip(torch.autograd.grad(want, params), torch.autograd.grad(got, params), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_matches_cross_entropy_in_fp32():
    hidden, weight, bias, labels = case(torch.float32)
    want = reference(hidden, weight, labels, bias)
    got = chunked_cross_entropy_sum(hidden, weight, labels, bias, chunk_size=16)
    # a sum of ~140 terms of ~6 in fp32: agreement to 1e-6 relative is rounding
    assert abs(float(got - want)) <= 1e-6 * abs(float(want))
    scale = torch.tensor(0.37)  # the loop divides by the window's token count before backward
    grads_want = torch.autograd.grad(want * scale, (hidden, weight, bias))
    grads_got = torch.autograd.grad(got * scale, (hidden, weight, bias))
    for a, b in zip(grads_want, grads_got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_frozen_head_gets_no_gradient_and_all_ignored_is_zero():
    hidden, weight, _, labels = case(torch.float32)
    weight = weight.detach()
    loss = chunked_cross_entropy_sum(hidden, weight, labels)
    (grad,) = torch.autograd.grad(loss, (hidden,))
    assert weight.grad is None and grad[labels == -100].abs().max() == 0
    nothing = chunked_cross_entropy_sum(hidden, weight, torch.full_like(labels, -100))
    assert float(nothing) == 0.0


def test_bf16_autocast_close_to_reference():
    hidden, weight, _, labels = case(torch.float32, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(hidden, weight, labels)
        got = chunked_cross_entropy_sum(hidden, weight, labels, chunk_size=32)
    # both round the logits' matmul to bf16 (8 bits of mantissa) before an fp32 softmax
    assert abs(float(got - want)) <= 1e-2 * abs(float(want))


# ---------------------------------------------------------------- CausalLMLoss on real models


@pytest.fixture(scope="module")
def micro():
    model, tokenizer, _ = build_model(ModelSection(name="builtin:micro-llama"), "cpu", seed=0)
    return model, tokenizer


def adapted(micro, **lora):
    torch.manual_seed(0)
    config = LoraConfig(r=4, alpha=8, dropout=0.0, **lora)
    model = get_method("lora").apply(copy.deepcopy(micro[0]), config)
    with torch.no_grad():  # B = 0 at init would hide any gradient path through the adapters
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.train()


def loss_and_grads(loss_fn, model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model, batch)
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize(
    "lora, chunked",
    [({}, True), ({"modules_to_save": ["lm_head"]}, True), ({"target_modules": ["q_proj", "lm_head"]}, False)],
    ids=["lora", "head-in-modules_to_save", "lora-on-head"],
)
def test_chunked_path_equals_full_logits(micro, lora, chunked):
    model = adapted(micro, **lora)
    batch = collate(random_examples(6, seed=4, vocab=262), micro[1].pad_token_id)
    chunked_loss = CausalLMLoss(chunk_size=8)
    got, got_grads = loss_and_grads(chunked_loss, model, batch)
    want, want_grads = loss_and_grads(CausalLMLoss(chunk_size=None), model, batch)
    assert (chunked_loss.fallback_reason[id(model)] is None) == chunked
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)
    for a, b in zip(want_grads, got_grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_post_head_transform_falls_back(micro):
    """A model whose logits are transformed after the head (soft-capping) must not be chunked."""
    model = copy.deepcopy(micro[0])
    model.config.final_logit_softcapping = 30.0
    loss = CausalLMLoss()
    loss(model, collate(random_examples(2, seed=5, vocab=262), micro[1].pad_token_id))
    assert "final_logit_softcapping" in loss.fallback_reason[id(model)]


def test_probe_draws_no_random_numbers_and_keeps_dropout(micro):
    """The one-time check runs in training mode with dropout on, and leaves the RNG as it found it."""
    torch.manual_seed(0)
    model = get_method("lora").apply(copy.deepcopy(micro[0]), LoraConfig(r=4, dropout=0.3)).train()
    batch = collate(random_examples(2, seed=6, vocab=262), micro[1].pad_token_id)
    loss = CausalLMLoss()
    state = torch.get_rng_state()
    reason = loss.reason_for_logits(model, {"input_ids": batch["input_ids"], "use_cache": False})
    assert reason is None
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training


def test_no_gradient_work_under_no_grad():
    """Evaluation of a model with a trainable head computes the loss only."""
    hidden, weight, bias, labels = case(torch.float32, seed=2)
    with torch.no_grad():
        loss = chunked_cross_entropy_sum(hidden, weight, labels, bias)
    assert loss.grad_fn is None
    assert float(loss) == pytest.approx(float(reference(hidden, weight, labels, bias)), rel=1e-6)
