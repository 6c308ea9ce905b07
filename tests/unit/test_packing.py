"""Packing: rows are exact re-arrangements of the examples, and attention never crosses a
boundary: every token's loss in a packed row equals its loss when its example runs alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftkit.data import Example, batch_order, collate
from ftkit.data.packing import pack_examples, padding_efficiency
from ftkit.models.load import build_model
from ftkit.recipe.schema import ModelSection
from ftkit.tasks.losses import CausalLMLoss, model_inputs
from tests.unit.test_loop import random_examples


def examples_of_lengths(lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        labels = [-100] + ids[1:]  # as encode_row: the first token never carries a label
        out.append(Example(input_ids=ids, labels=labels, source=f"mem:{i}"))
    return out


@pytest.fixture(scope="module")
def micro_fp32():
    """micro-llama (fp32, CPU) in sdpa and in eager attention."""
    return {
        attn: build_model(ModelSection(name="builtin:micro-llama", attn_implementation=attn), "cpu", seed=0)[0].eval()
        for attn in ("sdpa", "eager")
    }


def token_losses(model, batch: dict, flatten: bool = False) -> torch.Tensor:
    """Per-position next-token loss (0 where the label is -100), shape of labels[:, 1:]."""
    inputs = model_inputs(batch, flatten_packed=flatten)
    logits = model(**inputs).logits.reshape(*batch["input_ids"].shape, -1)[:, :-1]
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return torch.where(labels == -100, torch.zeros_like(losses), losses)


def test_rows_hold_every_example_once_and_fit():
    examples = examples_of_lengths([5, 60, 33, 17, 64, 2, 40, 31, 9, 64, 12, 50])
    rows, stats = pack_examples(examples, max_length=64, seed=0)
    pieces = []
    for row in rows:
        assert len(row.input_ids) <= 64
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        bounds = [*starts, len(row.input_ids)]
        pieces += [
            (tuple(row.input_ids[a:b]), tuple(row.labels[a:b])) for a, b in zip(bounds, bounds[1:], strict=False)
        ]
    assert sorted(pieces) == sorted((tuple(e.input_ids), tuple(e.labels)) for e in examples)
    total = sum(len(e.input_ids) for e in examples)
    # 387 tokens need at least ceil(387 / 64) = 7 rows; best-fit decreasing reaches it here
    assert stats["rows"] == len(rows) == 7
    assert stats["efficiency"] == pytest.approx(total / (7 * 64))
    assert pack_examples(examples, 64, seed=0)[0] == rows  # a pure function: resume packs the same rows


def test_collate_packed_restarts_positions_and_isolates_padding():
    rows, _ = pack_examples(examples_of_lengths([3, 2, 4]), max_length=6, seed=0)
    batch = collate(rows, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    # the padded tail counts from 0: a sequence of its own, never a continuation of the last one
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert batch["labels"][1, 3:].tolist() == [-100, -100, -100]
    assert "position_ids" not in collate(examples_of_lengths([3, 2]), pad_id=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_token_losses_equal_unpacked(micro_fp32, attn):
    model = micro_fp32[attn]
    examples = examples_of_lengths([7, 30, 12, 3, 25, 18, 9, 40, 14], seed=1)
    rows, _ = pack_examples(examples, max_length=48, seed=0)
    assert any(row.source.endswith("packed)") for row in rows)
    packed = collate(rows, pad_id=0)
    with torch.no_grad():
        got = token_losses(model, packed)
        alone = {tuple(e.input_ids): token_losses(model, collate([e], pad_id=0))[0] for e in examples}
    compared = 0
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        for a, b in zip(starts, starts[1:], strict=False):
            expected = alone[tuple(row.input_ids[a:b])]
            # positions a..b-2 predict tokens a+1..b-1 of the same example; b-1 predicts the next
            # example's first token, whose label is -100
            torch.testing.assert_close(got[r, a : b - 1], expected, atol=1e-5, rtol=0)
            if b - 1 < got.shape[1]:
                assert got[r, b - 1] == 0
            compared += b - a - 1
    assert compared == sum(len(e.input_ids) - 1 for e in examples)


def test_the_check_would_see_a_leak(micro_fp32):
    """With an all-ones 2-D mask (plain causal attention over the whole row), later examples
    attend to earlier ones: their losses move far beyond the 1e-5 the test above allows."""
    model = micro_fp32["sdpa"]
    rows, _ = pack_examples(examples_of_lengths([20, 20], seed=2), max_length=40, seed=0)
    packed = collate(rows, pad_id=0)
    leaky = {
        "input_ids": packed["input_ids"],
        "attention_mask": torch.ones_like(packed["input_ids"]),
        "use_cache": False,
    }
    with torch.no_grad():
        isolated = token_losses(model, packed)
        logits = model(**leaky, position_ids=packed["position_ids"]).logits[:, :-1]
    labels = packed["labels"][:, 1:]
    leaked = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none") * (labels != -100)
    assert (leaked[0, 20:] - isolated[0, 20:]).abs().max() > 1e-3
    torch.testing.assert_close(leaked[0, :19], isolated[0, :19], atol=1e-5, rtol=0)


def test_flattened_rows_equal_rows(micro_fp32):
    """The flash-attention layout (rows end to end in one) changes nothing: every row starts a sequence."""
    rows, _ = pack_examples(examples_of_lengths([10, 22, 15, 30, 8], seed=3), max_length=32, seed=0)
    packed = collate(rows, pad_id=0)
    model = micro_fp32["sdpa"]
    with torch.no_grad():
        by_rows = CausalLMLoss()(model, packed)
        flat = CausalLMLoss(flatten_packed=True)(model, packed)
    torch.testing.assert_close(flat, by_rows, atol=1e-4, rtol=1e-6)


def test_packing_beats_padding_on_mixed_lengths():
    """Lengths 50-1000 (the issue's benchmark shape): packing wastes far less than padding."""
    import random

    rng = random.Random(0)
    examples = examples_of_lengths([rng.randint(50, 1000) for _ in range(200)])
    lengths = [len(e.input_ids) for e in examples]
    plain = padding_efficiency(lengths, batch_order(lengths, 8, 0, 0, group_by_length=False))
    grouped = padding_efficiency(lengths, batch_order(lengths, 8, 0, 0, group_by_length=True))
    rows, stats = pack_examples(examples, 1024, seed=0)
    # examples over 512 tokens cannot share a row with each other, so ~0.94 is near the optimum here
    assert stats["efficiency"] > 0.9
    assert plain < 0.7  # uniform lengths in a batch of 8: the longest is ~890 on average, the mean ~525
    assert grouped > plain  # sorting within windows recovers much of it, at the cost of less random batches


def test_group_by_length_off_is_a_plain_shuffle():
    lengths = [len(e.input_ids) for e in random_examples(64, seed=0, vocab=262)]
    order = batch_order(lengths, 4, seed=3, epoch=0, group_by_length=False)
    assert sorted(i for batch in order for i in batch) == list(range(64))
    # no sorting inside batches: some batch is not in decreasing length order
    assert any([lengths[i] for i in b] != sorted((lengths[i] for i in b), reverse=True) for b in order)
