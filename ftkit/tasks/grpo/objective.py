"""The grpo objective: rollout → score → optimise, behind the loop's collate / units / loss_sum seam.

    collate(prompts)    training: G completions per prompt sampled from the policy (ftkit.tasks.grpo.rollouts),
                        scored by the rewards, advantages normalised within each prompt's group; the batch
                        holds prompt + completion rows, the completion mask and the advantages.
                        evaluation (model in eval mode): one greedy completion per prompt, scored.
    units(batch)        training: completion tokens (dapo), completions (grpo) or completions × max_new_tokens
                        (dr_grpo), see loss.py; evaluation: prompts
    loss_sum(model, b)  training: Σ of the clipped surrogate (+ β·KL) as loss.py normalises it; evaluation:
                        −Σ reward (so val_loss = −mean val reward: lower is better, as for every objective)

The loop calls collate for every micro-batch of a step before the first backward, so all of a step's
completions come from the policy as it stood at the step's start (on-policy; with iterations 1 the
old policy is that same policy: π_old = π.detach(), ratio 1, and the clipped formula is kept so its
gradient is TRL's). The reference for β > 0 is the model with its adapter disabled (no copy) or a
frozen copy for full / freeze (ftkit.tasks.preference.reference).

Per-step figures that are means over completions or groups (not over the loss units) go through
`window_metrics()`, which the loop asks once per step:
    reward, reward_std, reward/<label>     total and per-reward means over the step's completions
    completion_length                      mean completion tokens (EOS included)
    zero_adv_groups                        share of groups whose G rewards are all equal (no signal)
    kl                                     mean k3 KL per completion token (β > 0 only)
    clip_ratio                             share of completion tokens whose ratio was clipped
    rollout_s                              seconds spent sampling and scoring in the step
Per eval (prefixed val_ by the loop): reward, reward/<label>, completion_length, and exact_match
(completion == answer, stripped) when the rows have answers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from ftkit.data.prompt_rows import PromptExample
from ftkit.recipe.schema import ObjectiveSection
from ftkit.tasks.grpo import loss as grpo_loss
from ftkit.tasks.grpo import rewards as reward_fns
from ftkit.tasks.grpo.rollouts import sample_completions, sequences, token_logps
from ftkit.tasks.preference.reference import DisabledAdapter, eval_mode


class GRPOObjective:
    """GRPO (loss_type grpo / dr_grpo / dapo) as the loop's objective.

    `policy` is the unwrapped model that trains (it samples the rollouts); `reference` a DisabledAdapter or
    FrozenCopy when beta > 0 (only training needs it; evaluation scores rewards), else None; `rewards` from
    rewards.build_rewards.
    """

    name = "grpo"
    reports_perplexity = False  # exp(−reward) means nothing

    def __init__(
        self,
        cfg: ObjectiveSection,
        rewards: Sequence[reward_fns.Reward],
        policy: Any,
        tokenizer: Any,
        reference: Any = None,
    ):
        self.cfg, self.rewards, self.policy, self.tokenizer, self.reference = cfg, rewards, policy, tokenizer, reference
        self._window: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ collate

    def collate(self, examples: Sequence[PromptExample], pad_id: int) -> dict[str, torch.Tensor]:
        training = self.policy.training
        cfg = self.cfg
        started = time.perf_counter()
        copies = cfg.group_size if training else 1
        completions = sample_completions(
            self.policy,
            [e.input_ids for e in examples],
            copies,
            pad_id=pad_id,
            eos_id=self.tokenizer.eos_token_id,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature if training else None,
            top_p=cfg.top_p,
        )
        rows = [e for e in examples for _ in range(copies)]
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        total, per_reward = reward_fns.score(self.rewards, [e.prompt for e in rows], texts, rows)
        rewards = torch.tensor(total, dtype=torch.float32)
        batch = sequences([e.input_ids for e in rows], completions, pad_id)
        lengths = [len(c) for c in completions]
        if not training:
            exact = [
                float(e.answer is not None and t.strip() == e.answer.strip()) for e, t in zip(rows, texts, strict=True)
            ]
            batch |= {
                "rewards": rewards,
                "reward_parts": torch.tensor([per_reward[r.label] for r in self.rewards], dtype=torch.float32).T,
                "exact": torch.tensor(exact),
                "answered": torch.tensor([float(e.answer is not None) for e in rows]),
                "lengths": torch.tensor(lengths, dtype=torch.float32),
            }
            return batch
        batch["advantages"] = grpo_loss.group_advantages(rewards, copies, cfg.scale_rewards)
        grouped = rewards.view(-1, copies)
        window = self._window
        window.setdefault("rewards", []).extend(total)
        for label, values in per_reward.items():
            window.setdefault(f"reward/{label}", []).extend(values)
        window.setdefault("lengths", []).extend(lengths)
        window.setdefault("zero_adv", []).extend((grouped.max(1).values == grouped.min(1).values).float().tolist())
        window.setdefault("rollout_s", []).append(time.perf_counter() - started)
        return batch

    # ------------------------------------------------------------------ units, loss

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        if "advantages" not in batch:
            return int(batch["rewards"].numel())  # evaluation: prompts
        return grpo_loss.units(batch["completion_mask"][:, 1:], self.cfg.loss_type, self.cfg.max_new_tokens)

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if "advantages" not in batch:
            return self._eval_sums(batch)
        cfg = self.cfg
        mask = batch["completion_mask"][:, 1:]
        logps = token_logps(model, batch, cfg.temperature)
        old_logps = logps.detach()  # iterations 1: π_old is the policy that sampled, i.e. this one
        ref_logps = None
        if cfg.beta:
            if self.reference is None:
                raise ValueError("grpo with beta > 0 trains against a reference; none was given")
            ref_logps = self._reference_logps(batch)
        per_token, kl, ratio = grpo_loss.per_token_loss(
            logps, old_logps, batch["advantages"], cfg.epsilon, cfg.epsilon_high, cfg.beta, ref_logps
        )
        loss = grpo_loss.normalised_sum(per_token, mask, cfg.loss_type)
        with torch.no_grad():
            fmask = mask.float()
            tokens = float(fmask.sum())
            high = 1 + (cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high)
            adv = batch["advantages"].unsqueeze(1)
            clipped = ((ratio < 1 - cfg.epsilon) & (adv < 0)) | ((ratio > high) & (adv > 0))
            window = self._window
            window.setdefault("tokens", []).append(tokens)
            window.setdefault("clipped", []).append(float((clipped.float() * fmask).sum()))
            if kl is not None:
                window.setdefault("kl", []).append(float((kl * fmask).sum()))
        return loss, {}

    @torch.no_grad()
    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(self.reference, DisabledAdapter):
            model = self.reference.peft_model
            with model.disable_adapter(), eval_mode(model):
                return token_logps(model, batch, self.cfg.temperature)
        return token_logps(self.reference.model, batch, self.cfg.temperature)

    def _eval_sums(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        metrics = {"reward": float(batch["rewards"].sum()), "completion_length": float(batch["lengths"].sum())}
        for k, reward in enumerate(self.rewards):
            metrics[f"reward/{reward.label}"] = float(batch["reward_parts"][:, k].sum())
        if bool(batch["answered"].all()):
            metrics["exact_match"] = float(batch["exact"].sum())
        return -batch["rewards"].sum(), metrics

    # ------------------------------------------------------------------ per-step figures

    def window_metrics(self) -> dict[str, float]:
        """The step's rollout figures (see the module docstring), and a fresh window for the next step."""
        window, self._window = self._window, {}
        if not window.get("rewards"):
            return {}
        rewards = window["rewards"]
        out = {
            "reward": statistics.fmean(rewards),
            "reward_std": statistics.pstdev(rewards),
        }
        for key, values in window.items():
            if key.startswith("reward/"):
                out[key] = statistics.fmean(values)
        tokens = max(sum(window.get("tokens", [])), 1.0)
        out |= {
            "completion_length": statistics.fmean(window["lengths"]),
            "zero_adv_groups": statistics.fmean(window["zero_adv"]),
            "clip_ratio": sum(window.get("clipped", [])) / tokens,
            "rollout_s": sum(window["rollout_s"]),
        }
        if "kl" in window:
            out["kl"] = sum(window["kl"]) / tokens
        return out
