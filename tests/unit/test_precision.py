"""Trained weights of a 16-bit model (issue 15 part 1): fp32 master copies by default, or 16-bit with
a Kahan-compensated update, or plain 16-bit; what `ftkit plan` counts for each; what is refused."""

from __future__ import annotations

import copy

import pytest
import torch

from ftkit.methods import get_method
from ftkit.models.load import build_model
from ftkit.plan import trained_bytes_per_param
from ftkit.recipe import parse_recipe
from ftkit.recipe.methods import FreezeConfig, FullConfig
from ftkit.recipe.schema import ModelSection, TrainSection
from ftkit.train.optim import KahanAdamW, build_optimizer
from ftkit.train.precision import place_trained_weights, precision_problems

MINIMAL = "method: {name: full}\ndata: {train: d.jsonl}\n"


@pytest.fixture(scope="module")
def bf16_micro():
    model, _, _ = build_model(ModelSection(name="builtin:micro-llama", dtype="bfloat16"), "cpu", seed=0)
    return model


def _batch(vocab: int) -> dict:
    """Every token id once (so every embedding row has a gradient), in a seeded order, as 4 rows."""
    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    ids = torch.cat([order, order[: -vocab % 4]]).view(4, -1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _one_step(model, choice: str, lr: float = 1e-5) -> tuple[dict, dict, torch.optim.Optimizer]:
    """(trained tensors as fp32 before, after, the optimizer) of one AdamW step in bf16 autocast."""
    place_trained_weights(model, choice, torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, TrainSection(lr=lr, master_weights=choice))
    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**_batch(model.config.vocab_size)).loss
    loss.backward()
    optimizer.step()
    after = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            value = param.detach().float()
            compensation = optimizer.state[param].get("compensation")
            after[name] = value + compensation.float() if compensation is not None else value
    return before, after, optimizer


def _changed(before: dict, after: dict) -> float:
    changed = sum(int((after[n] != before[n]).sum()) for n in before)
    return changed / sum(t.numel() for t in before.values())


def test_one_step_at_1e_5_changes_over_99_percent_of_the_fp32_master_weights(bf16_micro):
    """The issue's unit test. AdamW's first step moves every weight with a gradient by ~lr = 1e-5; in
    bf16 that is below half an ulp of most weights (6e-5 at |w| = 0.02), so only the master copy
    can hold it. The plain bf16 run shows the failure the default avoids."""
    model = get_method("full").apply(copy.deepcopy(bf16_micro), FullConfig())
    before, after, _ = _one_step(model, "fp32")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # every weight trains: all are masters
    assert _changed(before, after) > 0.99

    plain = get_method("full").apply(copy.deepcopy(bf16_micro), FullConfig())
    before, after, _ = _one_step(plain, "none")
    assert all(p.dtype == torch.bfloat16 for p in plain.parameters())
    assert _changed(before, after) < 0.5  # measured 0.16: most updates round away


def test_kahan_keeps_the_update_in_weight_plus_compensation(bf16_micro):
    model = get_method("full").apply(copy.deepcopy(bf16_micro), FullConfig())
    before, after, optimizer = _one_step(model, "kahan")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # 2 B weight + 2 B compensation
    assert _changed(before, after) > 0.99
    state = next(iter(optimizer.state.values()))
    assert state["compensation"].dtype == torch.bfloat16 and state["exp_avg"].dtype == torch.float32


def test_frozen_weights_stay_in_the_load_dtype(bf16_micro):
    model = get_method("freeze").apply(copy.deepcopy(bf16_micro), FreezeConfig(trainable_layers=1))
    place_trained_weights(model, "fp32", torch.bfloat16)
    dtypes = {p.requires_grad: set() for p in model.parameters()}
    for param in model.parameters():
        dtypes[param.requires_grad].add(param.dtype)
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}}


def test_kahan_adamw_equals_torch_adamw_on_fp32_weights():
    """On fp32 weights there is nothing to compensate: the same arithmetic as torch's AdamW, bit for bit."""
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    theirs.load_state_dict(ours.state_dict())
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    opt_ours = KahanAdamW(ours.parameters(), **kwargs)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), foreach=False, **kwargs)
    for step in range(5):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


def test_kahan_state_reloads_with_fp32_moments_and_continues_exactly():
    """torch casts a loaded optimizer state to its parameter's dtype; the moments of a bf16 weight must
    come back fp32, or a resumed run would differ from the uninterrupted one."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64).to(torch.bfloat16))
    opt = KahanAdamW([weight], lr=1e-5)

    def step(param, optimizer, k):
        param.grad = torch.randn(64, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
        optimizer.step()

    for k in range(3):
        step(weight, opt, k)
    copy_weight = torch.nn.Parameter(weight.detach().clone())
    reloaded = KahanAdamW([copy_weight], lr=1e-5)
    reloaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert reloaded.state[copy_weight]["exp_avg_sq"].dtype == torch.float32
    for k in range(3, 6):
        step(weight, opt, k)
        step(copy_weight, reloaded, k)
    assert torch.equal(weight, copy_weight)
    assert torch.equal(opt.state[weight]["compensation"], reloaded.state[copy_weight]["compensation"])


def test_plan_counts_bytes_per_trained_parameter_for_each_choice():
    """fp32 masters: 4 master + 2 bf16 copy + 4 gradient + 8 AdamW; kahan: 2 + 2 compensation + 2 + 8;
    none: 2 + 2 + torch AdamW's states in bf16 (4)."""
    totals = {choice: trained_bytes_per_param(choice, 2, "adamw")["total"] for choice in ("fp32", "kahan", "none")}
    assert totals == {"fp32": 18, "kahan": 14, "none": 8}
    assert trained_bytes_per_param("fp32", 4, "adamw")["total"] == 16  # a float32 model: no choice to make
    assert trained_bytes_per_param("fp32", 2, "adamw_8bit")["optimizer"] < 2.1


def test_precision_refusals():
    recipe = parse_recipe(MINIMAL + "model: {dtype: float16}\n")
    (problem,) = precision_problems(recipe, "cpu")
    assert problem.startswith("model.dtype: fp16 trains with loss scaling")
    recipe = parse_recipe(MINIMAL + 'model: {dtype: bfloat16}\ntrain: {mixed_precision: "no"}\n')
    (problem,) = precision_problems(recipe, "cpu")
    assert problem.startswith("train.mixed_precision: no computes in the weights' own dtypes")
    assert precision_problems(parse_recipe(MINIMAL + "model: {dtype: bfloat16}\n"), "cpu") == []
    with pytest.raises(Exception, match="train.master_weights: kahan steps ftkit's compensated AdamW"):
        parse_recipe(MINIMAL + "train: {master_weights: kahan, optimizer: adamw_8bit}\n")
