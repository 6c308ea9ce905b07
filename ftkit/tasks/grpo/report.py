"""The RL section of a grpo run's summary and report: rewards, KL, clipping, lengths, and warnings.

Reads what the grpo objective logs (ftkit.tasks.grpo.objective): per step reward, reward_std,
reward/<label>, kl, clip_ratio, completion_length, zero_adv_groups, rollout_s; per eval val_reward,
val_reward/<label>, val_exact_match, val_completion_length.

Warnings (each one line in report.md):
    reward hacking signs   train reward rose by > HACK_REWARD_RISE while val exact match fell by
                           > HACK_EM_FALL (the policy found what the reward pays for, not the task)
    collapsed groups       in the last COLLAPSE_WINDOW steps a mean > COLLAPSE_SHARE of groups had all-equal
                           rewards: zero advantage, no gradient (the task is too easy or too hard, or sampling
                           too cold)
    length blow-up         mean completion length ended > LENGTH_GROWTH × where it started, or at
                           max_new_tokens having started well below it (completions no longer stop)
"""

from __future__ import annotations

import statistics
from typing import Any

#: reward up by this much (in reward units; built-in rewards lie in [0, 1]) while val exact match falls by
#: HACK_EM_FALL: below these a few val rows flipping is noise
HACK_REWARD_RISE, HACK_EM_FALL = 0.05, 0.05
#: share of zero-advantage groups above which most of a step's rollouts teach nothing
COLLAPSE_SHARE, COLLAPSE_WINDOW = 0.75, 5
#: completion length growth that is more than learning a longer answer format
LENGTH_GROWTH = 2.0

TRAIN_KEYS = ("reward", "reward_std", "kl", "clip_ratio", "completion_length", "zero_adv_groups", "rollout_s")
VAL_KEYS = ("reward", "exact_match", "completion_length")


def summarize_grpo(records: list[dict], facts: dict) -> dict | None:
    """First/last train and val figures, per-reward figures, mean step split and warnings; None without grpo metrics."""
    train = [r for r in records if "reward" in r and "val_loss" not in r]
    val = [r for r in records if "val_reward" in r]
    if not train and not val:
        return None
    figures: dict[str, Any] = {}
    reward_keys = sorted({k for r in train for k in r if k.startswith("reward/")})
    for split, rows, prefix, keys in (
        ("train", train, "", (*TRAIN_KEYS, *reward_keys)),
        ("val", val, "val_", (*VAL_KEYS, *reward_keys)),
    ):
        for key in keys:
            values = [float(r[prefix + key]) for r in rows if r.get(prefix + key) is not None]
            if values:
                figures[f"{split}/{key}"] = {"first": values[0], "last": values[-1], "mean": statistics.fmean(values)}
    return {"figures": figures, "warnings": warnings(train, val, facts), "n_evals": len(val)}


def warnings(train: list[dict], val: list[dict], facts: dict) -> list[str]:
    found = []
    rewards = [float(r["reward"]) for r in train]
    ems = [float(r["val_exact_match"]) for r in val if r.get("val_exact_match") is not None]
    if len(rewards) >= 2 and len(ems) >= 2:
        head = statistics.fmean(rewards[:COLLAPSE_WINDOW])
        tail = statistics.fmean(rewards[-COLLAPSE_WINDOW:])
        if tail - head > HACK_REWARD_RISE and ems[0] - ems[-1] > HACK_EM_FALL:
            found.append(
                f"reward hacking signs: train reward rose {head:.3f} → {tail:.3f} while val exact match fell "
                f"{ems[0]:.3f} → {ems[-1]:.3f}; read the samples, tighten the reward (or add exact_match), "
                "or raise objective.beta"
            )
    zero = [float(r["zero_adv_groups"]) for r in train if r.get("zero_adv_groups") is not None]
    if zero and statistics.fmean(zero[-COLLAPSE_WINDOW:]) > COLLAPSE_SHARE:
        found.append(
            f"collapsed groups: in the last steps {statistics.fmean(zero[-COLLAPSE_WINDOW:]):.0%} of groups had "
            "one reward for every completion (zero advantage, no gradient); raise objective.temperature or "
            "group_size, or use prompts the model sometimes gets right"
        )
    lengths = [float(r["completion_length"]) for r in train if r.get("completion_length") is not None]
    budget = facts.get("max_new_tokens")
    if len(lengths) >= 2:
        grew = lengths[-1] > LENGTH_GROWTH * max(lengths[0], 1.0)
        capped = budget is not None and lengths[-1] >= 0.95 * budget and lengths[0] < 0.8 * budget
        if grew or capped:
            found.append(
                f"length blow-up: mean completion length went {lengths[0]:.1f} → {lengths[-1]:.1f} tokens"
                f"{f' (max_new_tokens {budget})' if budget else ''}; the policy may be padding its answers or no "
                "longer stopping: check the samples, add a length-aware reward, or use loss_type dr_grpo / dapo"
            )
    return found


def grpo_section(grpo: dict, facts: dict) -> str:
    """report.md's RL section."""
    figures = grpo.get("figures") or {}
    lines = [
        "## Reinforcement learning (grpo)\n",
        f"loss_type {facts.get('loss_type', '?')} · group_size {facts.get('group_size', '?')} · "
        f"beta {facts.get('beta', '?')} · rewards {', '.join(facts.get('rewards') or [])}\n",
        "| | first | last | mean |",
        "|---|---|---|---|",
    ]
    for name, pair in figures.items():
        lines.append(f"| {name} | {pair['first']:.4g} | {pair['last']:.4g} | {pair['mean']:.4g} |")
    lines.append("")
    found = grpo.get("warnings") or []
    lines += [f"- ⚠ {w}" for w in found] or ["No reward-hacking, collapsed-group or length warnings."]
    lines += [
        "",
        "val_loss of a grpo run is −(mean val reward) of greedy completions: lower is better, and the best "
        "checkpoint is the one with the highest val reward. `reward` is the weighted sum of the rewards; "
        "`zero_adv_groups` the share of prompts whose completions all scored alike (they teach nothing); "
        "`clip_ratio` is 0 with iterations 1 (every ratio is 1).",
        "",
    ]
    return "\n".join(lines)
