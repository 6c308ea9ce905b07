"""GRPO: online reinforcement learning from verifiable rewards (objective grpo, data.format prompt).

rewards.py    built-in rewards (exact_match, regex, json, field_f1) and a user's functions, called on batches
rollouts.py   sampling G completions per prompt (transformers generate), training rows, per-token log-probs
loss.py       the clipped surrogate, k3 KL, and the grpo / dr_grpo / dapo normalisations (checked against TRL)
objective.py  GRPOObjective: rollout → score → optimise as the loop's collate / units / loss_sum
report.py     summary.json's `grpo` section and report.md's RL section (reward hacking, collapse, length)

`ftkit eval` on prompt rows (a grpo run, or any causal LM with `--format prompt`): greedy completions
of the prompts, scored by the run's rewards (exact_match for a model that was not trained with grpo):
`reward`, `reward/<label>`, `exact_match` (when rows have answers), `completion_length`, and `loss` =
−reward, which on the run's own validation set equals its last val_loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ftkit.io import messages
from ftkit.models.load import load_tokenizer
from ftkit.models.target import Target, load_model
from ftkit.recipe.schema import ObjectiveSection, Recipe, RewardSpec
from ftkit.tasks.causal_lm import SFT, CausalLMTask, text_fields
from ftkit.tasks.evaluation import EvalOptions, EvalSet, Evaluation
from ftkit.tasks.grpo.objective import GRPOObjective
from ftkit.tasks.grpo.report import grpo_section, summarize_grpo
from ftkit.tasks.grpo.rewards import build_rewards, check_columns
from ftkit.tasks.objective import evaluate
from ftkit.tasks.preference.reference import FrozenCopy, live_reference

__all__ = ["GRPOObjective", "GRPOTask", "prepare_objective"]


def prepare_objective(recipe: Recipe, model: Any, splits: Any, device: Any) -> tuple[GRPOObjective, dict]:
    """The recipe's grpo objective for `model` (unwrapped, method applied, untrained) and its summary facts.

    Imports the user's reward functions and checks that every row has what the rewards compare with;
    both raise before the first step (the run directory is then removed, nothing was trained)."""
    cfg = recipe.objective
    rewards = build_rewards(cfg.rewards)
    check_columns(rewards, splits.train, "data.train")
    check_columns(rewards, splits.val, "validation rows")
    reference = None
    if cfg.beta:
        reference = live_reference(model, recipe.method.is_adapter)
        if not isinstance(reference, FrozenCopy) and not _starts_at_base(model, recipe):
            print(
                f"note: {recipe.method.name} does not start at the base model, so the KL reference is a frozen "
                "copy of the initial policy",
                file=messages(),
            )
            reference = FrozenCopy(model)
    facts = {
        "task": "grpo",
        "objective": "grpo",
        "loss_type": cfg.loss_type,
        "group_size": cfg.group_size,
        "beta": cfg.beta,
        "max_new_tokens": cfg.max_new_tokens,
        "rewards": [r.label for r in rewards],
        "reference": reference.kind if reference is not None else "none",
        "reference_params": reference.extra_params if reference is not None else 0,
    }
    return GRPOObjective(cfg, rewards, model, load_tokenizer(recipe.model), reference), facts


def _starts_at_base(model: Any, recipe: Recipe) -> bool:
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    return getattr(recipe.method, "init", None) not in ("pissa", "olora")


def evaluate_prompts(
    model: Any, tokenizer: Any, examples: list, cfg: ObjectiveSection, batch_size: int
) -> dict[str, float]:
    """Greedy completions of `examples` (PromptExamples) scored by `cfg.rewards`: see the module docstring."""
    objective = GRPOObjective(cfg, build_rewards(cfg.rewards), model, tokenizer)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    result = evaluate(model, examples, batch_size, tokenizer.pad_token_id, device, objective)
    return result


class GRPOTask(CausalLMTask):
    """A causal LM improves its own sampled completions of prompts, scored by verifiable rewards."""

    name = "grpo"
    generates_text = True
    summary_key = "grpo"
    data_formats = ("prompt",)

    def objective(
        self, recipe: Recipe, model: Any, splits: Any, run_dir: Path, device: Any, pad_id: int
    ) -> tuple[GRPOObjective, dict]:
        return prepare_objective(recipe, model, splits, device)

    def scoring_objective(self, recipe: Recipe) -> SFT:
        return SFT()

    def summarize(self, records: list[dict], facts: dict) -> dict | None:
        return summarize_grpo(records, facts)

    def report_section(self, summary: dict, facts: dict) -> str:
        return grpo_section(summary, facts)

    def evaluate(self, target: Target, tokenizer: Any, evalset: EvalSet, options: EvalOptions) -> Evaluation:
        """Mean reward and exact match of greedy completions on the prompts; the base too with --baseline."""
        recipe = target.recipe
        if recipe is not None and recipe.objective.is_grpo:
            cfg = recipe.objective
        else:
            cfg = ObjectiveSection(name="grpo", rewards=[RewardSpec(name="exact_match")])
            print(f"note: {target.spec} was not trained with grpo; scoring exact_match", file=messages())
        if options.max_new_tokens is not None:
            cfg = cfg.model_copy(update={"max_new_tokens": options.max_new_tokens})
        check_columns(build_rewards(cfg.rewards), evalset.examples, evalset.label)
        model = load_model(target, tokenizer)
        with torch.no_grad():
            tuned = evaluate_prompts(model, tokenizer, evalset.examples, cfg, options.batch_size)
            base = None
            if options.baseline:
                if target.is_adapter:
                    with model.disable_adapter():
                        base = evaluate_prompts(model, tokenizer, evalset.examples, cfg, options.batch_size)
                else:
                    del model
                    base_model = load_model(target, tokenizer, base_only=True)
                    base = evaluate_prompts(base_model, tokenizer, evalset.examples, cfg, options.batch_size)
        return Evaluation(text_fields(target, evalset, tuned, base, "transformers"))
