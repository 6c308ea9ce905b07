"""Rollouts: a micro-batch of prompts → G sampled completions each, as right-padded training sequences.

    sample_completions(model, prompts, ...)   token ids of G completions per prompt (transformers `generate`:
                                              batched, left-padded, KV cache), each cut after its first EOS
    sequences(prompts, completions, pad_id)   [prompt_i + completion_i] right-padded, and the mask of the
                                              completion tokens (what the loss trains)
    token_logps(model, batch, temperature)    log π(token_t | tokens_<t) of every position, (N, T − 1)

Sampling draws from a private generator state: `torch.random.fork_rng` around `generate`, seeded with a
number drawn from torch's global CPU generator. The global generator is in every checkpoint (ftkit.train.
checkpoint), so a resumed run draws the same seeds and samples the same completions, and sampling
leaves the global stream (dropout, data) as it found it apart from that one draw.

Completions are sampled with the model in eval mode (no dropout) and trained in the mode the loop set.
The training forward re-reads prompt and completion as one right-padded row (positions 0, 1, ...,
exactly as in generation after left padding is removed), and its log-probs use the sampling
temperature (logits / T), as TRL does, so π is the distribution the completions came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ftkit.tasks.generation import _cuda_devices


def sample_completions(
    model: Any,
    prompts: Sequence[list[int]],
    copies: int,
    *,
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    temperature: float | None,
    top_p: float = 1.0,
) -> list[list[int]]:
    """`copies` completions per prompt, in order [p0 × copies, p1 × copies, ...]; greedy when `temperature` is None.
    Each keeps its first EOS (it is trained: the model learns to stop) and nothing after it."""
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    rows = [ids for ids in prompts for _ in range(copies)]
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):  # left padding: every prompt ends at the same position
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention[i, width - len(ids) :] = 1
    kwargs: dict[str, Any] = {"do_sample": temperature is not None}
    if temperature is not None:
        kwargs |= {"temperature": temperature, "top_p": top_p, "top_k": 0}
    seed = draw_seed() if temperature is not None else 0  # before the fork: the global stream moves on by one draw
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices() if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                use_cache=True,
                **kwargs,
            )
    finally:
        model.train(was_training)
    completions = []
    for row in out[:, width:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        completions.append(row)
    return completions


def draw_seed() -> int:
    """A seed from torch's global CPU generator (checkpointed, so a resume draws the same)."""
    return int(torch.randint(0, 2**62, (1,)))


def sequences(prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask of [prompt + completion] rows, right-padded, and `completion_mask`: 1 at the
    positions holding a completion token. `prompts[i]` belongs to `completions[i]`."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        completion_mask[i, len(prompt) : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion_mask}


def token_logps(model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """(N, T − 1) float32: entry t is log softmax(logits_t / temperature)[input_{t+1}]. Logits are cut to the
    last T positions, so prompt-learning adapters' virtual tokens line up."""
    input_ids = batch["input_ids"]
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -input_ids.size(1) :][:, :-1].float() / temperature
    targets = input_ids[:, 1:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
