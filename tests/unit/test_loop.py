"""The loop does what it claims: token-normalised accumulation, and parity with a
hand-written transformers + peft loop."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator

from ftkit.data import Example, batch_order, collate, split_step
from ftkit.methods import get_method
from ftkit.models.load import build_model
from ftkit.recipe.methods import LoraConfig
from ftkit.recipe.schema import ModelSection, TrainSection
from ftkit.train.loop import TrainState, train_loop
from ftkit.train.optim import build_optimizer


def random_examples(n: int, seed: int, vocab: int) -> list[Example]:
    """Variable-length examples with variable-length prompts (labels -100 on the prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(8, 40, (1,), generator=g))
        prompt = int(torch.randint(2, length - 2, (1,), generator=g))
        ids = torch.randint(3, vocab - 8, (length,), generator=g).tolist()
        out.append(Example(input_ids=ids, labels=[-100] * prompt + ids[prompt:], source=f"mem:{i}"))
    return out


@pytest.fixture(scope="module")
def micro():
    model, tokenizer, _ = build_model(ModelSection(name="builtin:micro-llama"), "cpu", seed=0)
    return model, tokenizer


def lora_model(micro):
    model = copy.deepcopy(micro[0])
    torch.manual_seed(0)
    model = get_method("lora").apply(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    # B starts at zero; give it values so both LoRA factors receive gradients
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return model


def run(model, examples, **train):
    cfg = TrainSection(**{"lr": 1e-3, "warmup_steps": 0, "scheduler": "constant", "max_grad_norm": None, **train})
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    state = TrainState()
    train_loop(model, opt, examples, [], cfg, cfg.max_steps, state, Accelerator(cpu=True), pad_id=0)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_grad_accum_equals_big_batch(micro):
    """bs 4 × accum 1 ≡ bs 1 × accum 4 on variable-length data (fp32, dropout 0).

    Tolerance 1e-6: only float summation order differs between the two."""
    examples = random_examples(4, seed=3, vocab=micro[0].config.vocab_size)
    big = run(lora_model(micro), examples, batch_size=4, grad_accum=1, max_steps=1)
    acc = run(lora_model(micro), examples, batch_size=1, grad_accum=4, max_steps=1)
    assert big.keys() == acc.keys()
    for name in big:
        assert torch.allclose(big[name], acc[name], atol=1e-6, rtol=0), name
    # and a per-micro-batch mean would NOT have matched: the lengths differ
    assert len({sum(x != -100 for x in e.labels) for e in examples}) > 1


def test_parity_with_hand_written_loop(micro):
    """20 LoRA steps of ftkit ≡ a plain transformers + peft loop with HF's own loss
    (num_items_in_batch normalisation), same order and seed. 1e-4 allows for fp32
    reduction-order differences over 20 AdamW steps."""
    examples = random_examples(32, seed=5, vocab=micro[0].config.vocab_size)
    bs, accum, steps = 4, 2, 20
    ours = run(lora_model(micro), examples, batch_size=bs, grad_accum=accum, max_steps=steps, seed=7)

    model = lora_model(micro)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    lengths = [len(e.input_ids) for e in examples]
    stream = [s for epoch in range(10) for s in batch_order(lengths, bs * accum, 7, epoch)]  # the steps' examples
    for step in range(steps):
        window = [collate([examples[i] for i in micro], pad_id=0) for micro in split_step(stream[step], bs)]
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        for batch in window:
            out = model(**batch, num_items_in_batch=torch.tensor(n_items))
            out.loss.backward()
        opt.step()
        opt.zero_grad()
    theirs = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-4, rtol=0), name
