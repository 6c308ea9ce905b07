"""A pretrained micro base for the methods that cannot learn on a random-init model.

Prompt methods and (IA)³ only reweight what the frozen model already computes. On a
random-init base that is almost nothing: a virtual token enters through an RMSNorm
(bounded norm) and two random 0.02-scale projections (W_v, W_o), so it barely moves the
logits, and 20 steps cannot lower the loss by 10% (measured: 1-5%). A tiny base that
already knows two output formats gives them something to steer:

    pretraining (mixed):   "Extract." → obj(color[red], shape[cube], size[12])
                           "List."    → red cube 12
    steering task:         "Task."    → red cube 12      (an instruction the base never saw)

The adapter learns to make an unseen instruction select the second format, which is
exactly what prompt tuning is for. Full fine-tuning of micro-llama for PRETRAIN_STEPS
steps takes a few seconds on one CPU thread, once per test session.
"""

from __future__ import annotations

import random
from pathlib import Path

from tests.support.helpers import make_rows, write_jsonl

PRETRAIN_STEPS = 120
PRETRAIN_BATCH = 16


def list_rows(n: int, seed: int, instruction: str) -> list[dict]:
    """The task of `make_rows` with the short answer format `color shape size`."""
    rows = []
    for row in make_rows(n, seed):
        words = row["input"].rstrip(".").split()  # "A red cube of size 12"
        rows.append({"instruction": instruction, "input": row["input"], "output": f"{words[1]} {words[2]} {words[-1]}"})
    return rows


def write_steer_data(root: Path) -> Path:
    """train.jsonl (64 rows) and val.jsonl (16 rows) of the steering task."""
    write_jsonl(root / "train.jsonl", list_rows(64, seed=1, instruction="Task."))
    write_jsonl(root / "val.jsonl", list_rows(16, seed=2, instruction="Task."))
    return root


def pretrain_micro_base(out_dir: Path, seed: int = 0) -> Path:
    """Fully fine-tune builtin:micro-llama on the mixed two-format task; save it as a model directory."""
    import torch

    from ftkit.data import collate, load_splits
    from ftkit.models.load import build_model
    from ftkit.recipe.schema import DataSection, ModelSection
    from ftkit.tasks.causal_lm import SFT

    mixed = make_rows(128, seed=11) + list_rows(128, seed=12, instruction="List.")
    random.Random(seed).shuffle(mixed)
    data = write_jsonl(out_dir.parent / f"{out_dir.name}-data" / "train.jsonl", mixed)
    model, tokenizer, _ = build_model(ModelSection(name="builtin:micro-llama"), "cpu", seed=seed)
    examples = load_splits(DataSection(train=str(data), max_length=128), tokenizer, seed).train
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    objective = SFT()
    model.train()
    for step in range(PRETRAIN_STEPS):
        batch = collate(
            [examples[(step * PRETRAIN_BATCH + i) % len(examples)] for i in range(PRETRAIN_BATCH)],
            tokenizer.pad_token_id,
        )
        loss, _ = objective.loss_sum(model, batch)
        (loss / objective.units(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
