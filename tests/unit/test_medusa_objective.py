"""Medusa's objective: the loss is Σ_k decay^k · CE_k over the trained tokens (+ the LM's with a LoRA base),
and engines refuse it where its forward would bypass the engine's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ftkit.data import collate
from ftkit.data.encode import Example
from ftkit.distributed import DistributedError, engines
from ftkit.methods.base import MethodHooks
from ftkit.methods.medusa import MedusaObjective, build
from ftkit.models.load import build_model
from ftkit.recipe import parse_recipe
from ftkit.recipe.methods import MedusaConfig
from ftkit.recipe.schema import ModelSection
from ftkit.tasks.causal_lm import SFT


@pytest.mark.parametrize("base", ["frozen", "lora"])
def test_loss_is_the_weighted_sum_of_the_heads_cross_entropies(base):
    model, _, _ = build_model(ModelSection(name="builtin:micro-llama"), "cpu", seed=0)
    config = MedusaConfig(heads=3, projection="own", base=base, decay=0.5)
    medusa = build(model, config)
    with torch.no_grad():  # heads that differ from lm_head, so each CE is its own
        for p in medusa.medusa.parameters():
            p.add_(0.01 * torch.randn_like(p))
    examples = [Example(list(range(5, 25)), [-100] * 8 + list(range(13, 25)), "a:1"),
                Example(list(range(30, 44)), [-100] * 5 + list(range(35, 44)), "a:2")]  # fmt: skip
    batch = collate(examples, 0)
    objective = MedusaObjective(SFT(), config)
    loss, metrics = objective.loss_sum(medusa, batch)
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels, expected = batch["labels"], torch.tensor(0.0)
    if base == "lora":
        logits = model.get_output_embeddings()(hidden)[:, :-1]
        expected = expected + F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
        )
    for k in range(3):
        head = medusa.medusa.medusa_head[k]
        logits = head(hidden)[:, : -(k + 2)]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, k + 2 :].reshape(-1), reduction="sum")
        assert float(metrics[f"medusa{k}_loss"]) == pytest.approx(float(ce), rel=1e-5)
        expected = expected + 0.5**k * ce
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert objective.units(batch) == 12 + 9  # the trained tokens, as SFT counts them
    trainable = [n for n, p in medusa.named_parameters() if p.requires_grad]
    assert all(n.startswith("medusa.") or "lora_" in n for n in trainable)
    assert any("lora_" in n for n in trainable) == (base == "lora")


def test_engines_refuse_the_objective_hook_where_gradients_would_not_sync():
    hooks = MethodHooks(objective=lambda task_objective: task_objective)
    text = "model: {name: builtin:micro-llama}\nmethod: {name: medusa}\ndata: {train: x.jsonl}\n"
    engines.check_method_hooks(SimpleNamespace(num_processes=1), parse_recipe(text), hooks)  # one process: fine
    with pytest.raises(DistributedError, match="own objective"):
        engines.check_method_hooks(SimpleNamespace(num_processes=2), parse_recipe(text), hooks)
    fsdp = parse_recipe(text + "distributed: {strategy: fsdp}\n")
    with pytest.raises(DistributedError, match=r"objective"):
        engines.check_method_hooks(SimpleNamespace(num_processes=2), fsdp, hooks)
