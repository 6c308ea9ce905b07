"""Preference tuning below the CLI: the `preference` data format, the objective section of the
recipe, the objective's log-probs and accumulation, and the reference strategies."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import Accelerator

from ftkit.data import PreferencePair, load_splits
from ftkit.errors import DataError, RecipeError, RunDirError
from ftkit.methods import get_method
from ftkit.models.builtin import build_byte_tokenizer
from ftkit.models.load import build_model
from ftkit.recipe import parse_recipe
from ftkit.recipe.methods import FullConfig, LoraConfig
from ftkit.recipe.schema import DataSection, ModelSection, ObjectiveSection, TrainSection
from ftkit.tasks.preference import (
    DisabledAdapter,
    FrozenCopy,
    ModelReference,
    Precomputed,
    PreferenceObjective,
    evaluate_preferences,
    load_reference_logps,
    sequence_logps,
)
from ftkit.tasks.preference.reference import attach, compute_reference_logps, save_reference_logps
from ftkit.train.loop import TrainState, train_loop
from ftkit.train.optim import build_optimizer

PAIR = {"prompt": "Add.\n\n2+2", "chosen": "4", "rejected": "5"}
CONVERSATION = {
    "prompt": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ],
    "chosen": [{"role": "assistant", "content": "good"}],
    "rejected": [{"role": "assistant", "content": "bad"}],
}


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load_pairs(tmp_path, tok, rows, **data):
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    return load_splits(DataSection(train=path, format="preference", **data), tok, seed=0).train


def trained(tok, example) -> str:
    return tok.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100])


# --- data ------------------------------------------------------------------------------------------------------------


def test_plain_pair_is_the_alpaca_rendering_with_only_the_answer_trained(tmp_path, tok):
    """A plain prompt goes through SFT's chat path: the chosen side equals the alpaca example of the same row."""
    (pair,) = load_pairs(tmp_path, tok, [PAIR])
    alpaca = load_splits(
        DataSection(train=write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "2+2", "output": "4"}])),
        tok,
        seed=0,
    ).train[0]
    assert (pair.chosen.input_ids, pair.chosen.labels) == (alpaca.input_ids, alpaca.labels)
    assert tok.decode(pair.rejected.input_ids) == "<|bos|><|user|>Add.\n\n2+2<|assistant|>5<|eos|>"
    assert trained(tok, pair.chosen) == "4<|eos|>" and trained(tok, pair.rejected) == "5<|eos|>"
    assert pair.source.endswith("train.jsonl:1") and pair.chosen.source == pair.source
    assert pair.length == max(len(pair.chosen.input_ids), len(pair.rejected.input_ids))


def test_conversational_pair_trains_only_the_final_answer(tmp_path, tok):
    (pair,) = load_pairs(tmp_path, tok, [CONVERSATION])
    assert tok.decode(pair.chosen.input_ids) == (
        "<|bos|><|system|>S<|user|>u1<|assistant|>a1<|eos|><|user|>u2<|assistant|>good<|eos|>"
    )
    assert trained(tok, pair.chosen) == "good<|eos|>"  # the earlier assistant turn a1 is prompt
    assert trained(tok, pair.rejected) == "bad<|eos|>"


def test_preference_stats_count_both_sides(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [PAIR, CONVERSATION])
    splits = load_splits(DataSection(train=path, format="preference"), tok, seed=0)
    assert splits.stats["train_target_tokens"] == 2 + 2 + 5 + 4  # answers + their EOS, both sides
    assert splits.stats["train_tokens"] == sum(
        len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in splits.train
    )


@pytest.mark.parametrize(
    "row, message",
    [
        ({**PAIR, "rejected": "4"}, "chosen and rejected are the same answer"),
        ({**PAIR, "chosen": " "}, "field 'chosen' is empty"),
        ({"prompt": "x", "chosen": "a"}, "missing field 'rejected' (format preference needs prompt, chosen, rejected"),
        ({**PAIR, "prompt": 3}, "field 'prompt' must be a string or a list of messages"),
        ({**CONVERSATION, "prompt": CONVERSATION["prompt"][:3]}, "the prompt ends with an assistant message"),
        ({**PAIR, "chosen": [{"role": "user", "content": "4"}]}, "chosen[0] has role 'user'"),
        ({**PAIR, "rejected": [{"role": "assistant", "content": "a"}] * 2}, "a list of one assistant message"),
    ],
)
def test_bad_pairs_name_file_and_line(tmp_path, tok, row, message):
    with pytest.raises(DataError) as err:
        load_pairs(tmp_path, tok, [PAIR, row])
    assert "train.jsonl:2: " in str(err.value) and message in str(err.value)


def test_pair_truncated_to_no_answer_tokens_is_an_error_naming_the_side(tmp_path, tok):
    long_prompt = {**PAIR, "prompt": "p" * 20, "chosen": "c" * 20}
    # the chosen answer alone exceeds 14 tokens, so the pair is cut at its end and the prompt fills them
    with pytest.raises(DataError, match=r"train\.jsonl:2 \(chosen\): no answer tokens left after truncation"):
        load_pairs(tmp_path, tok, [PAIR, long_prompt], max_length=14)


def test_a_long_prompt_is_cut_alike_on_both_sides_and_both_answers_keep_their_eos(tmp_path, tok):
    row = {"prompt": "p" * 30, "chosen": "yes", "rejected": "no, never"}
    pair = load_pairs(tmp_path, tok, [PAIR, row], max_length=20)[1]
    assert len(pair.rejected.input_ids) == 20 and len(pair.chosen.input_ids) < 20  # the longer side sets the cut
    prompt_len = [
        len(side.input_ids) - sum(label != -100 for label in side.labels) for side in (pair.chosen, pair.rejected)
    ]
    assert pair.chosen.input_ids[: prompt_len[0]] == pair.rejected.input_ids[: prompt_len[1]]  # one prompt
    assert (
        trained(tok, pair.chosen) == "yes" + tok.eos_token
        and trained(tok, pair.rejected) == "no, never" + tok.eos_token
    )


def test_truncated_pairs_are_counted(tmp_path, tok):
    row = {"prompt": "p", "chosen": "a" * 40, "rejected": "b"}
    splits = load_splits(
        DataSection(train=write_jsonl(tmp_path / "t.jsonl", [PAIR, row]), format="preference", max_length=24),
        tok,
        seed=0,
    )
    assert splits.stats["truncated_train"] == 1 and len(splits.train[1].chosen.input_ids) == 24


# --- recipe -----------------------------------------------------------------------------------------------------------


def recipe_text(objective: str, fmt: str = "preference", extra: str = "") -> str:
    return f"method: {{name: lora}}\ndata: {{train: t.jsonl, format: {fmt}{extra}}}\nobjective: {objective}\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (recipe_text("{name: dpo}", fmt="alpaca"), "recipe.yaml:3: objective.name: dpo learns from chosen/rejected"),
        (recipe_text("{name: sft}"), "recipe.yaml:2: data.format: preference pairs need a preference objective"),
        (recipe_text("{name: dpo, reference: none}"), "objective.reference: dpo needs a reference model"),
        (recipe_text("{name: orpo, reference: precompute}"), "objective.reference: orpo uses no reference model"),
        (recipe_text("{name: ipo, label_smoothing: 0.1}"), "objective.label_smoothing: only dpo and simpo"),
        (recipe_text("{name: dpo, gamma: 1}"), "objective.gamma: only simpo has a target margin"),
        (recipe_text("{name: dpo, label_smoothing: 0.5}"), "objective.label_smoothing: should be less than 0.5"),
        (recipe_text("{name: dpo}", extra=", train_on_prompt: true"), "data.train_on_prompt: preference losses"),
        (recipe_text("{name: dpx}"), "did you mean dpo?"),
        (recipe_text("{name: orpo, sft_weight: 1}"), "objective.sft_weight: adds an NLL term to dpo, ipo or simpo"),
        (recipe_text("{name: dpo, sft_weight: -1}"), "objective.sft_weight: should be greater than or equal to 0"),
    ],
)
def test_objective_rules_name_the_key(text, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe(text)
    assert message in str(err.value)


def test_objective_defaults_are_filled_and_noted():
    simpo = parse_recipe(recipe_text("{name: simpo}"))
    assert (simpo.objective.beta, simpo.objective.gamma) == (2.0, 1.0)
    assert any(note.startswith("objective.gamma: 1") for note in simpo.notes)
    dpo = parse_recipe(recipe_text("{name: dpo}"))
    assert (dpo.objective.beta, dpo.objective.reference) == (0.1, "auto")
    sft = parse_recipe("method: {name: lora}\ndata: {train: t.jsonl}\n")
    assert sft.objective.name == "sft" and sft.objective.beta is None


# --- objective and references on micro-llama --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro():
    model, tokenizer, _ = build_model(ModelSection(name="builtin:micro-llama"), "cpu", seed=0)
    return model, tokenizer


def random_pairs(n: int, seed: int, vocab: int) -> list[PreferencePair]:
    """Pairs sharing a random prompt, with answers of different lengths (labels -100 on the prompt)."""
    from ftkit.data import Example

    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        prompt = torch.randint(3, vocab - 8, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        sides = []
        for _ in range(2):
            answer = torch.randint(3, vocab - 8, (int(torch.randint(2, 15, (1,), generator=g)),), generator=g).tolist()
            sides.append(Example(prompt + answer, [-100] * len(prompt) + answer, f"mem:{i}"))
        pairs.append(PreferencePair(sides[0], sides[1], f"mem:{i}"))
    return pairs


def lora_model(micro, dropout: float = 0.0):
    model = copy.deepcopy(micro[0])
    torch.manual_seed(0)
    model = get_method("lora").apply(model, LoraConfig(r=4, alpha=8, dropout=dropout))
    # B starts at zero; give it values so the policy differs from the reference and both factors get gradients
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_sequence_logps_equal_transformers_loss(micro):
    """Σ log p over trained tokens = −(HF's mean cross-entropy × trained tokens), per sequence."""
    model = micro[0]
    pairs = random_pairs(3, seed=1, vocab=model.config.vocab_size)
    objective = PreferenceObjective(ObjectiveSection(name="orpo", beta=0.1))
    batch = objective.collate(pairs, pad_id=0)
    logps, tokens = sequence_logps(model, batch)
    for row in range(batch["input_ids"].size(0)):
        one = {k: v[row : row + 1] for k, v in batch.items()}
        loss = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"], labels=one["labels"]).loss
        assert float(logps[row]) == pytest.approx(-float(loss) * int(tokens[row]), abs=1e-4)


@pytest.mark.parametrize("name", ["dpo", "simpo"])
def test_sft_weight_adds_the_chosen_answers_mean_nll(micro, name):
    """RPO: loss = preference loss + α · (−π_c / n_c) per pair; the NLL is logged as nll/chosen."""
    model = micro[0]
    pairs = random_pairs(3, seed=5, vocab=model.config.vocab_size)
    plain = PreferenceObjective(ObjectiveSection(name=name, beta=0.5, gamma=0.0), ModelReference(model))
    rpo = PreferenceObjective(ObjectiveSection(name=name, beta=0.5, gamma=0.0, sft_weight=0.7), ModelReference(model))
    batch = plain.collate(pairs, pad_id=0)
    with torch.no_grad():
        base_loss, base_metrics = plain.loss_sum(model, batch)
        loss, metrics = rpo.loss_sum(model, batch)
        logps, tokens = sequence_logps(model, batch)
    nll = float((-logps[:3] / tokens[:3]).sum())
    assert float(loss) == pytest.approx(float(base_loss) + 0.7 * nll, rel=1e-6)
    assert metrics["nll/chosen"] == pytest.approx(nll, rel=1e-6) and "nll/chosen" not in base_metrics


def run_dpo(model, pairs, reference_of, **train) -> dict[str, torch.Tensor]:
    cfg = TrainSection(**{"lr": 1e-3, "warmup_steps": 0, "scheduler": "constant", "max_grad_norm": None, **train})
    objective = PreferenceObjective(ObjectiveSection(name="dpo", beta=0.5), reference_of(model))
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    train_loop(model, opt, pairs, [], cfg, cfg.max_steps, TrainState(), Accelerator(cpu=True), 0, objective=objective)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_grad_accum_is_exact_in_pairs(micro):
    """bs 4 × accum 1 ≡ bs 1 × accum 4 for DPO: one pair is one unit. 1e-6: summation order only."""
    pairs = random_pairs(4, seed=3, vocab=micro[0].config.vocab_size)
    start = {n: p.detach().clone() for n, p in lora_model(micro).named_parameters() if p.requires_grad}
    big = run_dpo(lora_model(micro), pairs, DisabledAdapter, batch_size=4, grad_accum=1, max_steps=1)
    acc = run_dpo(lora_model(micro), pairs, DisabledAdapter, batch_size=1, grad_accum=4, max_steps=1)
    for name in big:
        assert torch.allclose(big[name], acc[name], atol=1e-6, rtol=0), name
    assert any(not torch.equal(big[name], start[name]) for name in big)  # the step did move the adapter


def test_references_agree_and_the_disabled_adapter_holds_no_copy(micro, tmp_path):
    """Disabled adapter, the base model itself, and precomputed log-probs (through the safetensors file)
    give the same ρ; only the frozen copy holds extra parameters. 1e-5: same maths, batched differently."""
    base = micro[0]
    pairs = random_pairs(6, seed=4, vocab=base.config.vocab_size)
    model = lora_model(micro, dropout=0.1)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    disabled = DisabledAdapter(model)
    assert disabled.extra_params == 0 and disabled.peft_model is model  # the training network itself
    assert sum(p.numel() for p in model.parameters()) == n_params
    objective = PreferenceObjective(ObjectiveSection(name="dpo", beta=0.1), disabled)
    batch = objective.collate(pairs, pad_id=0)
    via_adapter = disabled.logps(batch)
    assert model.training  # the reference pass restored train mode
    via_base = ModelReference(base).logps(batch)
    assert torch.allclose(via_adapter, via_base, atol=1e-5)
    policy = sequence_logps(model.eval(), batch)[0]
    assert not torch.allclose(policy, via_base, atol=1e-3)  # the adapter is really off in the reference pass

    logps = compute_reference_logps(disabled, pairs, batch_size=4, pad_id=0, device=torch.device("cpu"))
    save_reference_logps(tmp_path, {"train": (pairs, logps)})
    fresh = copy.deepcopy(pairs)
    load_reference_logps(tmp_path, "train", fresh)
    precomputed = PreferenceObjective(ObjectiveSection(name="dpo", beta=0.1), Precomputed())
    assert torch.allclose(Precomputed().logps(precomputed.collate(fresh, pad_id=0)), via_base, atol=1e-5)

    copy_ref = FrozenCopy(get_method("full").apply(copy.deepcopy(base), FullConfig()))
    assert copy_ref.extra_params == sum(p.numel() for p in base.parameters())
    assert not any(p.requires_grad for p in copy_ref.model.parameters())


def test_precomputed_file_refuses_other_data(micro, tmp_path):
    pairs = random_pairs(3, seed=5, vocab=micro[0].config.vocab_size)
    attach(pairs, torch.zeros(3, 2))
    save_reference_logps(tmp_path, {"val": (pairs, torch.zeros(3, 2))})
    other = random_pairs(3, seed=6, vocab=micro[0].config.vocab_size)
    with pytest.raises(RunDirError, match="computed on other data"):
        load_reference_logps(tmp_path, "val", other)


def test_evaluate_preferences_of_the_reference_is_a_tie(micro):
    """Before training the policy is the reference: every margin is 0 and no pair is won (a tie is lost)."""
    model = get_method("lora").apply(copy.deepcopy(micro[0]), LoraConfig(r=4, alpha=8, dropout=0.0))
    pairs = random_pairs(5, seed=7, vocab=micro[0].config.vocab_size)
    result = evaluate_preferences(model, pairs, ObjectiveSection(name="dpo", beta=0.1), pad_id=0, batch_size=2)
    assert result["pairs"] == 5
    assert result["rewards/accuracy"] == 0.0 and result["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert result["loss"] == pytest.approx(0.6931472, abs=1e-5)  # −log σ(0)
    assert 0.0 <= result["logps/accuracy"] <= 1.0 and result["logps/chosen"] < 0
