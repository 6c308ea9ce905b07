"""Medusa's speculative decoding: the candidate tree, and output token-for-token equal to greedy decoding.

The heads here are an oracle that knows greedy decoding's continuation, right at rank 0, right at rank 1
or wrong depending on the position, so every branch of acceptance runs: long accepted paths, a second-
rank child, nothing accepted, and the KV cache cut back after each.
"""

from __future__ import annotations

import pytest
import torch

from ftkit.methods.medusa import MedusaHeads, MedusaModel, build
from ftkit.methods.medusa_decode import TREE, build_tree, medusa_generate, plain_generate
from ftkit.models.load import build_model
from ftkit.recipe.methods import MedusaConfig
from ftkit.recipe.schema import ModelSection


def test_tree_orders_nodes_by_depth_and_masks_to_ancestors():
    tree = build_tree(TREE, heads=4)
    assert len(tree.paths) == len(TREE) == 8
    assert list(tree.depth) == sorted(tree.depth) and tree.depth[0] == 0
    assert tree.topk == (3, 2, 1, 1)  # ranks 0-2 from head 0, 0-1 from head 1, rank 0 from heads 2 and 3
    for i, path in enumerate(tree.paths, start=1):
        ancestors = {j for j in range(len(tree.depth)) if tree.ancestors[i, j]}
        expected = {0, i} | {tree.paths.index(path[:d]) + 1 for d in range(1, len(path))}
        assert ancestors == expected


def test_tree_drops_paths_deeper_than_the_heads_and_refuses_orphans():
    assert max(build_tree(TREE, heads=2).depth) == 2
    with pytest.raises(ValueError, match="no parent"):
        build_tree([(0,), (1, 0)], heads=4)


class OracleHeads(MedusaHeads):
    """At the hidden state that predicts greedy token t, head k proposes greedy token t+k+1: at rank 0, at
    rank 1 (a wrong token at rank 0) or not at all, by (t // 3 + k) % 3."""

    def __init__(self, lm_head, heads, hidden_of_position, continuation):
        super().__init__(lm_head, heads, 1, "shared")
        self.hidden_of_position, self.continuation = hidden_of_position, continuation

    def logits(self, k, hidden):
        t = int(torch.cdist(hidden[None].float(), self.hidden_of_position.float()).argmin())
        out = torch.zeros(self.vocab_size)
        wanted = t + k + 1
        if wanted < len(self.continuation):
            token = self.continuation[wanted]
            case = (t // 3 + k) % 3
            if case == 0:
                out[token] = 10.0
            elif case == 1:
                out[token], out[(token + 1) % self.vocab_size] = 5.0, 10.0
            else:
                out[(token + 1) % self.vocab_size] = 10.0
        return out


@pytest.fixture(scope="module")
def micro():
    model, tokenizer, _ = build_model(ModelSection(name="builtin:micro-llama"), "cpu", seed=0)
    model.eval()
    return model, tokenizer


@pytest.mark.parametrize("prompt", ["obj(color[red], shape[", "Extract: a blue cube", "x", "size[42]) and"])
def test_speculative_output_equals_greedy_generate(micro, prompt):
    base, tokenizer = micro
    model = build(base, MedusaConfig(heads=4, projection="shared"))
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    budget = 40
    with torch.no_grad():
        greedy = base.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=budget, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
        )[0, len(ids):].tolist()  # fmt: skip
        text = torch.tensor([ids + greedy])
        hidden = base.get_decoder()(input_ids=text).last_hidden_state[0]
    # hidden[len(ids) - 1 + t] is where the base predicts greedy[t]
    oracle = OracleHeads(base.get_output_embeddings(), 4, hidden[len(ids) - 1 :], greedy)
    medusa = MedusaModel(base, oracle, model.method)
    new, stats = medusa_generate(medusa, ids, budget, eos=set())
    assert new == greedy
    plain, _ = plain_generate(medusa, ids, budget, eos=set())
    assert plain == greedy
    assert max(stats.accepted) >= 3 and min(stats.accepted) == 1  # long paths and rejections both ran
    # later steps speculate from the last accepted position too (not the prompt's: 1 token a forward after the first)
    assert max(stats.accepted[1:]) >= 3 and stats.tokens_per_forward >= 1.5
    assert stats.forwards < budget - 1


def test_untrained_heads_still_give_greedy_output(micro):
    base, tokenizer = micro
    medusa = build(base, MedusaConfig(heads=3, projection="own", head_layers=2))
    ids = tokenizer("A red cone of size 7.", add_special_tokens=False).input_ids
    new, _ = medusa_generate(medusa, ids, 30, eos=set())
    plain, _ = plain_generate(medusa, ids, 30, eos=set())
    assert new == plain and len(new) == 30
