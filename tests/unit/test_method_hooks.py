"""The method interface beyond `apply`: optimizer groups, step hooks, penalties, and prompt methods'
logit alignment; each checked against the loop or peft doing the same thing by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from ftkit.data import Example, collate
from ftkit.errors import ModelError
from ftkit.methods import RunInfo, get_method
from ftkit.methods.adalora import orthogonality_penalty
from ftkit.models.load import build_model
from ftkit.recipe import methods as c
from ftkit.recipe.schema import ModelSection, TrainSection
from ftkit.tasks.causal_lm import SFT, token_logits
from ftkit.tasks.objective import Regularized, evaluate
from ftkit.train.loop import Hooks, TrainState, train_loop
from ftkit.train.optim import build_optimizer


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    model, tokenizer, _ = build_model(
        ModelSection(name="builtin:micro-llama"), "cpu", seed=0, base_dir=tmp_path_factory.mktemp("micro")
    )
    return model, tokenizer


def examples(n: int, seed: int) -> list[Example]:
    """Variable-length examples, the first 3 tokens of each untrained (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 250, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist()
        out.append(Example(input_ids=ids, labels=[-100] * 3 + ids[3:], source=f"mem:{i}"))
    return out


def applied(micro, config, total_steps: int = 4):
    model = copy.deepcopy(micro[0])
    torch.manual_seed(0)
    entry = get_method(config.name)
    run = RunInfo(total_steps=total_steps, train=train_cfg(max_steps=total_steps))
    model = entry.apply(model, config, run)
    return model, entry.hooks(model, config, run)


def train_cfg(**overrides) -> TrainSection:
    base = {"lr": 1e-2, "warmup_steps": 0, "scheduler": "constant", "max_grad_norm": None, "batch_size": 4}
    return TrainSection(**(base | overrides))


def run_loop(model, optimizer, steps: int, hooks: Hooks | None = None, objective=None, data=None, **train):
    cfg = train_cfg(max_steps=steps, **train)
    state = TrainState()
    data = examples(8, 1) if data is None else data
    train_loop(model, optimizer, data, [], cfg, steps, state, Accelerator(cpu=True), 0, hooks, objective)
    return state


# --- optimizer groups ---------------------------------------------------------------------------


def test_lora_plus_trains_b_at_lr_ratio_times_a_through_the_schedule(micro):
    """LoRA+: the loop sets each group's LR from the schedule × its lr_scale: A at lr, B at λ·lr."""
    model, hooks = applied(micro, c.LoraPlusConfig(r=4, alpha=8, dropout=0.0, lr_ratio=8))
    groups = hooks.param_groups
    b_ids = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    assert [g["lr_scale"] for g in groups] == [1.0, 8.0]
    assert {id(p) for p in groups[1]["params"]} == b_ids
    assert not {id(p) for p in groups[0]["params"]} & b_ids
    optimizer = build_optimizer(groups, train_cfg())
    run_loop(model, optimizer, steps=1, lr=2e-3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-3, 16e-3])


@pytest.mark.parametrize("projected", [True, False])
def test_lora_fa_keeps_a_at_its_init_and_trains_b(micro, projected):
    model, hooks = applied(micro, c.LoraFaConfig(r=4, alpha=8, dropout=0.0, projected_gradient=projected))
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert a_before and not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    if projected:
        optimizer = hooks.optimizer(train_cfg())
        assert type(optimizer).__name__ == "LoraFAOptimizer"  # peft's projected-gradient AdamW
    else:
        assert hooks.optimizer is None
        optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], train_cfg())
    run_loop(model, optimizer, steps=3)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], a) for n, a in a_before.items())  # bit-identical
    assert all(not torch.equal(after[n], b) for n, b in b_before.items())


# --- step hooks and penalties -------------------------------------------------------------------


def test_before_zero_grad_sees_the_steps_gradients_and_counts_from_one(micro):
    model, _ = applied(micro, c.LoraConfig(r=4, alpha=8, dropout=0.0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    seen = []

    def before(step):
        seen.append(("before", step, all(p.grad is not None for p in trainable)))

    def after(step):
        seen.append(("after", step, any(p.grad is not None for p in trainable)))

    optimizer = build_optimizer(trainable, train_cfg())
    run_loop(model, optimizer, steps=3, hooks=Hooks(before_zero_grad=[before], after_step=[after]))
    assert seen == [(when, step, when == "before") for step in (1, 2, 3) for when in ("before", "after")]


def test_adalora_reallocates_its_budget_through_the_hook(micro):
    """With tinit 0 and tfinal 0 over 4 steps, the last step fixes the final budget: target_r per layer."""
    config = c.AdaloraConfig(init_r=6, target_r=2, alpha=8)
    model, hooks = applied(micro, config, total_steps=4)
    assert len(hooks.before_zero_grad) == 1 and hooks.regularizer is not None
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], train_cfg())
    run_loop(model, optimizer, steps=4, hooks=Hooks(before_zero_grad=hooks.before_zero_grad))
    # ftkit holds the pattern between steps (so checkpoints keep full-rank tensors); it is the method state
    assert model.peft_config["default"].rank_pattern is None
    masks = {k: v for k, v in hooks.state().items() if k.startswith("rank_pattern/")}
    assert masks and sum(int(m.sum()) for m in masks.values()) == 2 * len(masks)


def test_adalora_rejects_a_schedule_longer_than_the_run(micro):
    with pytest.raises(ModelError, match=r"method.tinit: tinit 3 \+ tfinal 2 leave no steps of the run's 4"):
        applied(micro, c.AdaloraConfig(tinit=3, tfinal=2), total_steps=4)


def test_orthogonality_penalty_is_peft_s_own_term(micro):
    """peft adds orth_reg_weight · R to outputs.loss when labels are passed; ours is the same R."""
    model, _ = applied(micro, c.AdaloraConfig(init_r=4, target_r=2, orth_reg_weight=0.5))
    batch = collate(examples(2, 3), pad_id=0)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        plain = model.get_base_model()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ce = F.cross_entropy(
            plain.logits[:, :-1].reshape(-1, plain.logits.size(-1)), batch["labels"][:, 1:].reshape(-1)
        )
        penalty = orthogonality_penalty(model, 0.5)
    assert float(penalty) > 0
    assert float(out.loss - ce) == pytest.approx(float(penalty), rel=1e-4)


def test_penalty_counts_once_per_step_and_never_in_eval_or_the_logged_loss(micro):
    """bs 4 × accum 1 ≡ bs 1 × accum 4 with a penalty too: R · units(batch) / window units sums to R."""
    model, _ = applied(micro, c.LoraConfig(r=4, alpha=8, dropout=0.0))
    penalty_value = 0.75
    objective = Regularized(SFT(), lambda: torch.tensor(penalty_value))
    records = []
    runs = {}
    for bs, accum in ((4, 1), (1, 4)):
        m = copy.deepcopy(model)
        optimizer = build_optimizer([p for p in m.parameters() if p.requires_grad], train_cfg())
        records.clear()
        hooks = Hooks(log=records.append)
        run_loop(m, optimizer, 1, hooks, objective, data=examples(4, 1), batch_size=bs, grad_accum=accum)
        runs[(bs, accum)] = records[0]
    plain = SFT()
    batch = collate(examples(4, 1), pad_id=0)
    for record in runs.values():
        assert record["reg_loss"] == pytest.approx(penalty_value)
    assert runs[(4, 1)]["loss"] == pytest.approx(runs[(1, 4)]["loss"], rel=1e-5)
    model.eval()
    assert evaluate(model, examples(4, 2), 4, 0, "cpu", objective) == evaluate(
        model, examples(4, 2), 4, 0, "cpu", plain
    )
    model.train()
    with torch.no_grad():
        loss, metrics = objective.loss_sum(model, batch)
        assert float(loss) == pytest.approx(float(plain.loss_sum(model, batch)[0]) + penalty_value * plain.units(batch))


# --- prompt methods: virtual tokens and the labels ----------------------------------------------


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning"])
def test_prompt_logits_are_realigned_with_the_labels(micro, name):
    """peft returns T + n positions (n virtual first); token_logits keeps the T that follow the
    prompt, which equal the base model fed [P ; E(x)] by hand, and the SFT loss uses exactly them."""
    n = 4
    config = get_method(name).config(num_virtual_tokens=n)
    model, _ = applied(micro, config)
    model.eval()
    batch = collate(examples(3, 4), pad_id=0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        raw = model(input_ids=ids, attention_mask=mask).logits
        aligned = token_logits(model, batch)
        prompts = model.get_prompt(batch_size=ids.shape[0])
        embeds = torch.cat([prompts, model.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([torch.ones(ids.shape[0], n, dtype=mask.dtype), mask], dim=1)
        by_hand = model.get_base_model()(inputs_embeds=embeds, attention_mask=full_mask).logits[:, n:]
        loss, _ = SFT().loss_sum(model, batch)
    assert raw.shape[1] == ids.shape[1] + n and aligned.shape[1] == ids.shape[1]
    assert torch.allclose(aligned, by_hand, atol=1e-5)
    expected = F.cross_entropy(
        by_hand[:, :-1].reshape(-1, by_hand.size(-1)), batch["labels"][:, 1:].reshape(-1), reduction="sum"
    )
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    wrong = raw[:, : ids.shape[1]]  # the first T positions: what an unsliced objective would score
    assert not torch.allclose(wrong, by_hand, atol=1e-3)


def test_prefix_tuning_keeps_the_logits_length(micro):
    model, _ = applied(micro, c.PrefixTuningConfig(num_virtual_tokens=4))
    batch = collate(examples(2, 5), pad_id=0)
    with torch.no_grad():
        assert (
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.shape[1]
            == (batch["input_ids"].shape[1])
        )


# --- inits --------------------------------------------------------------------------------------


def test_gaussian_init_starts_at_the_base_with_a_of_std_one_over_r(micro):
    model, _ = applied(micro, c.LoraConfig(r=8, alpha=16, dropout=0.0, init="gaussian"))
    a = torch.cat([p.flatten() for n, p in model.named_parameters() if "lora_A" in n])
    b = torch.cat([p.flatten() for n, p in model.named_parameters() if "lora_B" in n])
    assert torch.count_nonzero(b) == 0
    assert float(a.std()) == pytest.approx(1 / 8, rel=0.1)  # peft: N(0, 1/r); 10% for ~10k samples


def test_pissa_starts_at_the_base_model(micro):
    """W = (W − s·BA) + s·BA: the residual base plus the principal adapter is the original model."""
    model, _ = applied(micro, c.LoraConfig(r=4, alpha=4, dropout=0.0, init="pissa"))
    batch = collate(examples(2, 6), pad_id=0)
    with torch.no_grad():
        ours = token_logits(model, batch)
        original = token_logits(micro[0], batch)
        with model.disable_adapter():
            residual = token_logits(model, batch)
    assert torch.allclose(ours, original, atol=1e-4)
    assert not torch.allclose(residual, original, atol=1e-3)  # the base really was changed


def test_loftq_says_it_needs_a_gpu_before_building_anything(micro):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: LoftQ is tested end to end in tests/integration/test_gpu_methods.py")
    with pytest.raises(ModelError, match="method.init: loftq runs on a CUDA GPU only"):
        applied(micro, c.QloraConfig(init="loftq"))
