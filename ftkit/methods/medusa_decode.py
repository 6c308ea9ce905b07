"""Greedy speculative decoding with Medusa heads, and loading a medusa run for it.

One step, from the last hidden state h of the accepted text and the next token x₀ (the base's argmax,
certain):

1. candidates: head k's top-k tokens for position +k+1 after x₀; a candidate tree picks paths through
   them (`TREE`: tuples of top-k ranks, one per depth, as FasterDecoding/Medusa's `medusa_choices`);
2. verification: one forward of [x₀, tree nodes] on the KV cache, each node at position past + depth,
   attending to the cache, its ancestors and itself (a 4-D additive attention mask);
3. acceptance: from x₀, follow the child whose token is the base's argmax at its parent, as long as one
   matches; every accepted token is exactly what greedy decoding would have produced, and the base's
   argmax at the last accepted node is the next x₀. Tokens per forward = accepted nodes + 1;
4. the KV cache keeps the entries of the accepted path only (transformers' DynamicCache: each layer's
   keys / values tensors, sliced along the sequence).

So the output equals plain greedy decoding of the same model (up to float ties: the tree forward sums
in another order than a one-token forward).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftkit.errors import ModelError
from ftkit.methods.medusa import MedusaHeads, MedusaModel, hf_model, load_heads
from ftkit.models.load import build_model
from ftkit.models.target import Target, attach_adapter, device_type
from ftkit.recipe.methods import MedusaConfig
from ftkit.rundir import BASE, MEDUSA_CONFIG, MEDUSA_HEADS

#: the default candidate tree: 8 nodes, top-k ranks per depth (FasterDecoding/Medusa's medusa_choices format)
TREE: tuple[tuple[int, ...], ...] = ((0,), (0, 0), (1,), (0, 1), (0, 0, 0), (1, 0), (2,), (0, 0, 0, 0))


def is_medusa_target(target: Target) -> bool:
    """A medusa run's final/ or checkpoint (its recipe's method is medusa and the heads are there)."""
    return (
        target.recipe is not None
        and isinstance(target.recipe.method, MedusaConfig)
        and (Path(target.weights) / MEDUSA_HEADS).is_file()
    )


def load_medusa(target: Target, tokenizer: Any) -> MedusaModel:
    """The run's base (+ its LoRA with base: lora) and the trained heads, in eval mode on the device."""
    method = target.recipe.method
    weights = Path(target.weights)
    saved = json.loads((weights / MEDUSA_CONFIG).read_text())
    if saved.get("medusa_num_heads") != method.heads or saved.get("medusa_num_layers") != method.head_layers:
        raise ModelError(f"{weights}/{MEDUSA_CONFIG}: heads / layers differ from the run's recipe.yaml")
    if target.is_adapter:
        base = target.base
    else:
        base = target.base or str((target.run_dir / BASE).resolve())
        if not Path(base).is_dir():
            base = target.recipe.model.name
    cfg = target.model_cfg.model_copy(update={"name": base})
    model, _, _ = build_model(cfg, device_type(), seed=0, tokenizer=tokenizer)
    if cfg.quantization is None:
        model = model.to(device_type())
    if target.is_adapter:
        model = attach_adapter(model, str(weights))
    heads = MedusaHeads(hf_model(model).get_output_embeddings(), method.heads, method.head_layers, method.projection)
    load_heads(heads, weights)
    medusa = MedusaModel(model, heads, method, base)
    medusa.eval()
    return medusa


# ---------------------------------------------------------------- the tree


@dataclass(frozen=True)
class Tree:
    """Nodes 1..n of the verification input (0 is x₀): each node's path, depth, parent and children."""

    paths: tuple[tuple[int, ...], ...]
    parent: tuple[int, ...]  # index of each input position's parent (-1 for x₀)
    depth: tuple[int, ...]  # 0 for x₀
    children: tuple[tuple[int, ...], ...]
    topk: tuple[int, ...]  # candidates needed from head k (k = depth - 1)
    ancestors: torch.Tensor  # (n+1, n+1) bool: row i may attend to column j (j an ancestor of i, or i)


def build_tree(choices: Sequence[Sequence[int]], heads: int) -> Tree:
    """The tree of `choices` (paths deeper than `heads` dropped); ValueError when a path's parent is missing."""
    paths = sorted({tuple(p) for p in choices if 0 < len(p) <= heads}, key=lambda p: (len(p), p))
    index = {(): 0} | {p: i + 1 for i, p in enumerate(paths)}
    for p in paths:
        if p[:-1] not in index:
            raise ValueError(f"medusa tree: {list(p)} has no parent {list(p[:-1])}")
    parent = (-1, *(index[p[:-1]] for p in paths))
    depth = (0, *(len(p) for p in paths))
    n = len(paths) + 1
    children = tuple(tuple(j for j in range(1, n) if parent[j] == i) for i in range(n))
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            ancestors[i, j] = True
            j = parent[j]
    topk = tuple(max((p[k] + 1 for p in paths if len(p) > k), default=0) for k in range(max(depth)))
    return Tree(tuple(paths), parent, depth, children, topk, ancestors)


# ---------------------------------------------------------------- decoding


@dataclass
class DecodeStats:
    forwards: int = 0  # verification forwards (the prefill not counted)
    accepted: list[int] = field(default_factory=list)  # tokens produced by each verification forward
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return sum(self.accepted) / max(len(self.accepted), 1)


def _stop_at(tokens: list[int], eos: set[int], limit: int) -> list[int]:
    """Greedy generate's output: up to and including the first EOS, at most `limit` tokens."""
    for i, tok in enumerate(tokens[:limit]):
        if tok in eos:
            return tokens[: i + 1]
    return tokens[:limit]


def _prefill(hf: Any, ids: list[int]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(KV cache, last hidden state (H,), its logits (V,)) after the prompt."""
    device = next(hf.parameters()).device
    out = hf.get_decoder()(input_ids=torch.tensor([ids], device=device), use_cache=True)
    hidden = out.last_hidden_state[0, -1]
    return out.cache, hidden, hf.get_output_embeddings()(hidden)


@torch.no_grad()
def medusa_generate(
    model: MedusaModel, ids: list[int], max_new_tokens: int, eos: set[int], tree: Tree | None = None
) -> tuple[list[int], DecodeStats]:
    """Greedy completion of prompt `ids` with the heads' speculation (module docstring)."""
    tree = tree or build_tree(TREE, model.medusa.num_heads)
    hf, heads = model.hf, model.medusa
    stats, start = DecodeStats(), time.perf_counter()
    cache, hidden, logits = _prefill(hf, ids)
    device = hidden.device
    past = len(ids)
    root = int(logits.argmax())
    new = [root]
    n = len(tree.depth)
    depth = torch.tensor(tree.depth, device=device)
    blocked = torch.finfo(hf.dtype).min
    tree_mask = torch.where(tree.ancestors.to(device), 0.0, blocked).to(hf.dtype)
    while len(new) < max_new_tokens and root not in eos:
        # head k's top-k at `hidden` (the last accepted position p, whose argmax is root = token p+1): p+k+2
        candidates = [heads.logits(k, hidden).topk(tree.topk[k]).indices.tolist() for k in range(len(tree.topk))]
        tokens = [root] + [candidates[len(p) - 1][p[-1]] for p in tree.paths]
        mask = torch.cat([torch.zeros(n, past, dtype=hf.dtype, device=device), tree_mask], dim=1)
        out = hf.get_decoder()(
            input_ids=torch.tensor([tokens], device=device),
            position_ids=(past + depth)[None],
            attention_mask=mask[None, None],
            cache=cache,
            use_cache=True,
        )
        states = out.last_hidden_state[0]
        predicted = hf.get_output_embeddings()(states).argmax(-1).tolist()
        path, node = [0], 0
        while True:
            match = next((c for c in tree.children[node] if tokens[c] == predicted[node]), None)
            if match is None or tokens[node] in eos:
                break
            path.append(match)
            node = match
        keep = torch.tensor(path, device=device) + past
        for layer in cache.layers:
            layer.keys = torch.cat([layer.keys[..., :past, :], layer.keys[..., keep, :]], dim=-2)
            layer.values = torch.cat([layer.values[..., :past, :], layer.values[..., keep, :]], dim=-2)
        past += len(path)
        new += [tokens[i] for i in path[1:]]
        stats.forwards += 1
        stats.accepted.append(len(path))
        if tokens[node] in eos:
            break
        root = predicted[node]
        hidden = states[node]  # the heads speculate from the last accepted position
        new.append(root)
    stats.seconds = time.perf_counter() - start
    return _stop_at(new, eos, max_new_tokens), stats


@torch.no_grad()
def plain_generate(model: MedusaModel, ids: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], float]:
    """Greedy completion one token per forward on the same KV cache code (the like-for-like baseline);
    (tokens, seconds)."""
    hf = model.hf
    start = time.perf_counter()
    cache, _, logits = _prefill(hf, ids)
    device = logits.device
    new = [int(logits.argmax())]
    while len(new) < max_new_tokens and new[-1] not in eos:
        out = hf(input_ids=torch.tensor([[new[-1]]], device=device), cache=cache, use_cache=True)
        cache = out.cache
        new.append(int(out.logits[0, -1].argmax()))
    return _stop_at(new, eos, max_new_tokens), time.perf_counter() - start


@torch.no_grad()
def hf_greedy(model: MedusaModel, ids: list[int], max_new_tokens: int, pad_id: int | None) -> tuple[list[int], float]:
    """transformers' `generate` (greedy) on the same model; (new tokens, seconds)."""
    device = next(model.hf.parameters()).device
    tensor = torch.tensor([ids], device=device)
    start = time.perf_counter()
    out = model.base.generate(
        input_ids=tensor,
        attention_mask=torch.ones_like(tensor),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    return out[0, len(ids) :].tolist(), time.perf_counter() - start


def eos_ids(model: MedusaModel, tokenizer: Any) -> set[int]:
    """The ids greedy `generate` stops at: the generation config's eos ids, else the tokenizer's."""
    found = getattr(model.hf.generation_config, "eos_token_id", None)
    if found is None:
        found = tokenizer.eos_token_id
    if found is None:
        return set()
    return set(found) if isinstance(found, list) else {int(found)}
