"""Delta-LoRA as ftkit runs it (untouched W_0, a forward term λ·s·(sg(BA) − B_K A_K) x) against the
paper's Algorithm 1 written out (W += λ·s·(B_n A_n − B_{n−1} A_{n−1}) in place after each step n > K),
and final/ as the rank-2r LoRA that reproduces it."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate.utils import set_seed

from ftkit.errors import ModelError, RecipeError
from ftkit.methods import RunInfo, get_method
from ftkit.recipe import parse_recipe
from ftkit.recipe.methods import DeltaLoraConfig, LoraConfig

RATIO, START, STEPS = 0.5, 2, 6


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from ftkit.models.builtin import materialize_builtin

    path = materialize_builtin("builtin:micro-llama", tmp_path_factory.mktemp("micro") / "base", seed=0)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def batches(vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (4, 12), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def lora_layers(model) -> dict:
    from ftkit.methods.delta_lora import adapted_layers

    return adapted_layers(model)


def test_forward_term_equals_the_paper_s_in_place_update_of_w(micro, tmp_path):
    """Same init, same AdamW, same batches: every loss of ftkit's Delta-LoRA equals the paper's
    algorithm run literally on a plain LoRA model whose W is rewritten after each step (1e-5:
    the two sum the same terms in a different order, fp32), and so do the final logits."""
    path, base = micro
    config = DeltaLoraConfig(r=4, alpha=8, update_ratio=RATIO, start_step=START)
    set_seed(0)
    ours = get_method("delta_lora").apply(copy.deepcopy(base), config, RunInfo(total_steps=STEPS))
    hooks = get_method("delta_lora").hooks(ours, config, RunInfo(total_steps=STEPS))
    set_seed(0)
    paper = get_method("lora").apply(copy.deepcopy(base), LoraConfig(r=4, alpha=8, dropout=0.0))
    scale = config.alpha / config.r
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_paper = torch.optim.AdamW([p for p in paper.parameters() if p.requires_grad], lr=1e-2)
    layers = lora_layers(paper)

    def product(layer):
        return layer.lora_B["default"].weight @ layer.lora_A["default"].weight

    data = batches(base.config.vocab_size)
    for step, batch in enumerate(data, start=1):
        before = {name: product(layer).detach().clone() for name, layer in layers.items()}
        losses = []
        for model, optimizer in ((ours, opt_ours), (paper, opt_paper)):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        for hook in hooks.after_step:
            hook(step)
        if step > START:  # the paper's update of W, in place
            with torch.no_grad():
                for name, layer in layers.items():
                    layer.base_layer.weight += RATIO * scale * (product(layer) - before[name])
        assert losses[0] == pytest.approx(losses[1], abs=1e-5), step
    ours.eval(), paper.eval()
    with torch.no_grad():
        ours_logits, paper_logits = ours(**data[0]).logits, paper(**data[0]).logits
    assert (ours_logits - paper_logits).abs().max() < 1e-4
    # final/: the plain rank-2r LoRA of the docstring, on the untouched base, loaded by peft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load(adapter):
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return PeftModel.from_pretrained(base, adapter).eval()

    hooks.save_final(ours, tmp_path / "final")
    ours.save_pretrained(tmp_path / "adapter-alone")  # B_T A_T without W's share
    loaded = load(tmp_path / "final")
    assert loaded.peft_config["default"].r == 2 * config.r
    with torch.no_grad():
        assert (loaded(**data[0]).logits - ours_logits).abs().max() < 1e-5
        assert (loaded.merge_and_unload()(**data[0]).logits - ours_logits).abs().max() < 1e-4
        assert (load(tmp_path / "adapter-alone")(**data[0]).logits - ours_logits).abs().max() > 1e-3  # W did move


def test_snapshot_is_the_state_a_checkpoint_carries(micro):
    """Before step K there is nothing to save; after it, load_state puts the same snapshot back."""
    _, base = micro
    config = DeltaLoraConfig(r=4, alpha=8, start_step=3)
    model = get_method("delta_lora").apply(copy.deepcopy(base), config, RunInfo(total_steps=10))
    hooks = get_method("delta_lora").hooks(model, config, RunInfo(total_steps=10))
    assert hooks.state() == {}
    for hook in hooks.after_step:
        hook(3)
    saved = {k: v.clone() for k, v in hooks.state().items()}
    assert len(saved) == 2 * len(lora_layers(model))
    hooks.load_state({})  # a checkpoint from before K
    assert hooks.state() == {}
    hooks.load_state(saved)
    assert all(torch.equal(saved[k], v) for k, v in hooks.state().items())


RECIPE = "data: {{train: d.jsonl}}\ntrain: {{max_steps: 10}}\nmethod: {{name: delta_lora, {keys}}}\n"


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ("dropout: 0.1", "method.dropout: delta_lora needs 0"),
        ("init: pissa", "method.init"),
        ("bias: all", "method.bias: delta_lora moves W by the adapter's B A only"),
        ("threshold: 0.9", "lora_drop"),  # another method's key: names its owner
    ],
)
def test_bad_keys_are_refused_naming_the_key(keys, expected):
    with pytest.raises(RecipeError) as caught:
        parse_recipe(RECIPE.format(keys=keys))
    assert expected in str(caught.value)


def test_threshold_error_lists_delta_lora_s_own_keys():
    with pytest.raises(RecipeError) as caught:
        parse_recipe(RECIPE.format(keys="threshold: 0.9"))
    assert "update_ratio" in str(caught.value) and "start_step" in str(caught.value)


def test_start_step_at_or_after_the_end_is_refused(micro):
    _, base = micro
    with pytest.raises(ModelError, match="method.start_step: 10 is not below the run's 10 steps"):
        get_method("delta_lora").apply(copy.deepcopy(base), DeltaLoraConfig(start_step=10), RunInfo(total_steps=10))
