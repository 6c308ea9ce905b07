"""Preference tuning: DPO, IPO, ORPO and SimPO on chosen/rejected pairs.

losses.py      the per-pair formulas (pure tensor maths, checked against TRL)
objective.py   PreferenceObjective: the loop's collate / units / loss_sum for pairs
reference.py   where DPO/IPO's reference log-probs come from (disabled adapter, frozen copy, precomputed)

prepare_objective(recipe, model, splits, run_dir, ...) -> (objective, facts)   what `ftkit train` calls
evaluate_preferences(model, pairs, objective, ...) -> {loss, rewards/accuracy, ...}   for `ftkit eval`

`ftkit eval` on preference pairs (`data.format: preference`: a DPO/IPO/ORPO/SimPO run, or any
causal LM with `--format preference`) reports the objective's own metrics (`evaluate_pairs`):
loss, rewards/chosen, rewards/rejected, rewards/accuracy, rewards/margin, logps/* — no generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ftkit.data import PreferencePair
from ftkit.data.splits import sequences
from ftkit.io import messages
from ftkit.models.target import Target, adapter_disabled, device_type, load_model
from ftkit.recipe.schema import PREFERENCE_OBJECTIVES, ObjectiveSection, Recipe
from ftkit.tasks.causal_lm import SFT, CausalLMTask, text_fields
from ftkit.tasks.evaluation import EvalOptions, EvalSet, Evaluation
from ftkit.tasks.objective import evaluate
from ftkit.tasks.preference.objective import PreferenceObjective, sequence_logps
from ftkit.tasks.preference.reference import (
    REFERENCE_FILE,
    DisabledAdapter,
    FrozenCopy,
    ModelReference,
    Precomputed,
    attach,
    compute_reference_logps,
    live_reference,
    load_reference_logps,
    save_reference_logps,
)
from ftkit.tasks.preference.report import preference_section, summarize_preferences

__all__ = [
    "REFERENCE_FILE",
    "DisabledAdapter",
    "FrozenCopy",
    "ModelReference",
    "Precomputed",
    "PreferenceObjective",
    "PreferenceTask",
    "evaluate_preferences",
    "load_reference_logps",
    "prepare_objective",
    "sequence_logps",
]


def prepare_objective(
    recipe: Recipe, model: Any, splits: Any, run_dir: Path, device: Any, pad_id: int
) -> tuple[PreferenceObjective, dict]:
    """The recipe's preference objective, with its reference ready, and facts for summary.json.

    `model` is the unwrapped model after the method was applied, before the first step. With
    `reference: precompute`, ρ of every train and val pair is computed now and written to
    `run_dir/reference_logps.safetensors`.
    """
    cfg = recipe.objective
    reference = None
    if cfg.needs_reference:
        live = live_reference(model, recipe.method.is_adapter)
        precompute = cfg.reference == "precompute"
        if cfg.reference == "auto" and isinstance(live, DisabledAdapter) and not _starts_at_base(model, recipe):
            # the reference is the policy at step 0; disabling this adapter does not give it back
            print(
                f"note: {recipe.method.name} does not start at the base model (virtual tokens or a "
                "decomposed base), so the reference log-probs are precomputed from the initial policy",
                file=messages(),
            )
            precompute = True
        if precompute:
            if isinstance(live, FrozenCopy):
                live = ModelReference(model)  # the model is still untrained: no copy needed for one pass
            tensors = {}
            for split, pairs in (("train", splits.train), ("val", splits.val)):
                if pairs:
                    logps = compute_reference_logps(live, pairs, recipe.train.batch_size, pad_id, device)
                    attach(pairs, logps)
                    tensors[split] = (pairs, logps)
            save_reference_logps(run_dir, tensors)
            print(
                f"reference log-probs of {len(splits.train) + len(splits.val)} pairs → {REFERENCE_FILE}",
                file=messages(),
            )
            reference = Precomputed()
        else:
            reference = live
    facts = {
        "objective": cfg.name,
        "beta": cfg.beta,
        "reference": reference.kind if reference is not None else "none",
        "reference_params": reference.extra_params if reference is not None else 0,
    }
    return PreferenceObjective(cfg, reference), facts


def _starts_at_base(model: Any, recipe: Recipe) -> bool:
    """True when the untrained adapter leaves the base's outputs unchanged, so that the model
    with its adapter disabled equals the initial policy. Prompt-learning adapters prepend
    virtual tokens, and PiSSA/OLoRA move part of W into the adapter: both break it."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    return getattr(recipe.method, "init", None) not in ("pissa", "olora")


def evaluate_preferences(
    model: Any,
    pairs: Sequence[PreferencePair],
    objective: ObjectiveSection,
    *,
    pad_id: int,
    batch_size: int = 8,
    device: Any = "cpu",
    reference_model: Any = None,
) -> dict[str, float]:
    """Mean loss and preference metrics of `model` over `pairs` (see objective.py for the keys), plus `pairs`.

    The reference for dpo/ipo is, in this order: the pairs' precomputed `ref_logps`
    (`load_reference_logps(run_dir, "val", pairs)`), `reference_model` (e.g. the base of a full
    fine-tune, used as is), or the model itself with its adapter disabled (a PeftModel).
    """
    reference = None
    if objective.needs_reference:
        if pairs and all(p.ref_logps is not None for p in pairs):
            reference = Precomputed()
        elif reference_model is not None:
            reference = ModelReference(reference_model)
        elif hasattr(model, "disable_adapter"):
            reference = DisabledAdapter(model)
        else:
            raise ValueError(
                f"{objective.name} needs a reference: pass reference_model, precomputed ref_logps, or a PeftModel"
            )
    device = torch.device(device) if isinstance(device, str) else device
    result = evaluate(model, pairs, batch_size, pad_id, device, PreferenceObjective(objective, reference))
    return result | {"pairs": len(pairs)}


def evaluate_pairs(
    target: Target, tokenizer: Any, evalset: EvalSet, batch_size: int, baseline: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(tuned, base or None) preference metrics on chosen/rejected pairs: the loss of the run's
    objective (dpo with beta 0.1 when the target is no preference run), implicit rewards,
    reward accuracy and margin, and the reference-free `logps/accuracy`.

    The reference is the one the run trained against: its precomputed log-probs when it
    stored them and this is its validation set; otherwise an adapter's base (the adapter
    switched off, no second copy) or, for a full fine-tune, its base model loaded beside it.
    `baseline` scores that reference as the policy: its rewards are 0 by definition, and its
    `logps/accuracy` says how often it already ranked the chosen answer first.
    """
    recipe = target.recipe
    if recipe is not None and recipe.objective.name in PREFERENCE_OBJECTIVES:
        objective = recipe.objective
    else:
        objective = ObjectiveSection(name="dpo")
        print(
            f"note: {target.spec} was not trained with a preference objective; scoring dpo with beta {objective.beta}",
            file=messages(),
        )
    pairs = evalset.examples
    stored = target.run_dir is not None and (target.run_dir / REFERENCE_FILE).is_file()
    if objective.needs_reference and stored and evalset.own_val:
        load_reference_logps(target.run_dir, "val", pairs)
    model = load_model(target, tokenizer)
    device = torch.device(device_type())
    reference_model = None
    if objective.needs_reference and not target.is_adapter and not all(p.ref_logps is not None for p in pairs):
        reference_model = load_model(target, tokenizer, base_only=True)

    def score(policy: Any, reference: Any) -> dict[str, Any]:
        result = evaluate_preferences(
            policy,
            pairs,
            objective,
            pad_id=tokenizer.pad_token_id,
            batch_size=batch_size,
            device=device,
            reference_model=reference,
        )
        return {key: value for key, value in result.items() if key != "pairs"}

    tuned = score(model, reference_model)
    base = None
    if baseline:  # the reference as the policy (its own reference, unless the pairs carry precomputed ones)
        if target.is_adapter:
            with adapter_disabled(target, model):
                base = score(model, model)
        else:
            loaded = reference_model is not None
            base_model = reference_model if loaded else load_model(target, tokenizer, base_only=True)
            base = score(base_model, base_model)
    return tuned, base


class PreferenceTask(CausalLMTask):
    """A causal LM learns to prefer the chosen answer of each pair (dpo, ipo, orpo, simpo).

    It writes text like any causal LM (`predict`, report samples); it is measured on pairs."""

    name = "preference"
    generates_text = True
    summary_key = "preference"
    data_formats = ("preference",)
    objectives = PREFERENCE_OBJECTIVES

    def objective(
        self, recipe: Recipe, model: Any, splits: Any, run_dir: Path, device: Any, pad_id: int
    ) -> tuple[PreferenceObjective, dict]:
        return prepare_objective(recipe, model, splits, run_dir, device, pad_id)

    def scoring_objective(self, recipe: Recipe) -> SFT:
        return SFT()  # a method's scoring run learns and scores the chosen answers

    def summarize(self, records: list[dict], facts: dict) -> dict | None:
        return summarize_preferences(records)

    def report_section(self, summary: dict, facts: dict) -> str:
        return preference_section(summary)

    def score(self, model: Any, examples: Sequence[Any], pad_id: int) -> tuple[torch.Tensor, float]:
        """The causal LM's score over every sequence of `examples`: both answers of each pair."""
        return super().score(model, sequences(list(examples)), pad_id)

    def evaluate(self, target: Target, tokenizer: Any, evalset: EvalSet, options: EvalOptions) -> Evaluation:
        tuned, base = evaluate_pairs(target, tokenizer, evalset, options.batch_size, options.baseline)
        return Evaluation(text_fields(target, evalset, tuned, base, None))
