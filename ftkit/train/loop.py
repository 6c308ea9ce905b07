"""The training loop: micro-step, accumulate, clip, step, eval, log, checkpoint.

It receives a model, an optimizer, a stream of micro-batches and a state object;
it never asks which method or model is running. Logging, progress and checkpoint
writing are callbacks that sit beside the maths.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ftkit.data import Example, batch_order, split_step
from ftkit.distributed import collectives
from ftkit.errors import NonFiniteError
from ftkit.recipe.schema import TrainSection
from ftkit.tasks.causal_lm import SFT
from ftkit.tasks.objective import PENALTY, evaluate
from ftkit.train.optim import lr_at


@dataclass
class TrainState:
    """Counters that define where training stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next optimizer step's examples
    step_in_epoch: int = 0  # optimizer steps' worth of examples of `epoch` already consumed
    micro_step: int = 0  # forward/backward passes done
    tokens_seen: int = 0  # non-pad input tokens processed
    skipped_steps: int = 0  # steps whose update was dropped for a non-finite loss (on_nonfinite: skip)
    train_s: float = 0.0  # seconds inside optimizer steps (no eval, no checkpoint writing)
    best_val_loss: float | None = None
    best_step: int | None = None
    last_val_loss: float | None = None
    history: list[dict] = field(default_factory=list)  # eval results, newest last

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Hooks:
    """What the loop calls out to; every member is optional.

    Step hooks get the number of optimizer steps done, the current one included (1-based).
    `before_zero_grad` runs right after `optimizer.step()`, while the step's gradients are
    still there (AdaLoRA scores importance from them); `after_step` once the step is complete.
    """

    log: Callable[[dict], None] = lambda record: None  # logged records (every log_every steps, evals, events)
    progress: Callable[[dict], None] = lambda record: None  # every step's record, for the progress display
    checkpoint: Callable[[TrainState], None] = lambda state: None
    before_zero_grad: Sequence[Callable[[int], None]] = ()  # method hooks that need the step's gradients
    after_step: Sequence[Callable[[int], None]] = ()  # per-step method hooks (e.g. AdaLoRA's budget update)
    should_stop: Callable[[TrainState], bool] = lambda state: False  # asked at every step boundary (signals)


def step_batches(
    examples: Sequence[Example], step_size: int, seed: int, state: TrainState, group_by_length: bool = True
) -> Iterator[list[int]]:
    """Endless stream of optimizer steps (lists of example indices, `step_size` each but the last of an
    epoch) from where `state` stands.

    The order is a pure function of (seed, epoch, step_size), so a resumed run replays it exactly,
    also with another batch_size × grad_accum of the same product. Advances `state.epoch` /
    `state.step_in_epoch` as steps are handed out.
    """
    lengths = [e.length for e in examples]
    while True:
        order = batch_order(lengths, step_size, seed, state.epoch, group_by_length)
        for position in range(state.step_in_epoch, len(order)):
            state.step_in_epoch = position + 1
            yield order[position]
        state.epoch += 1
        state.step_in_epoch = 0


def train_loop(
    model: Any,
    optimizer: Any,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    cfg: TrainSection,
    total_steps: int,
    state: TrainState,
    accelerator: Any,
    pad_id: int,
    hooks: Hooks | None = None,
    objective: Any = None,
) -> TrainState:
    """Run optimizer steps until `total_steps`, starting from `state`.

    Gradient accumulation normalises by tokens, not micro-batches: for a window of
    `grad_accum` micro-batches with T trained tokens in all, each micro-batch
    contributes (sum of its token losses) / T. So `batch_size 8 × grad_accum 1` and
    `batch_size 1 × grad_accum 8` give the same gradient on variable-length data,
    which a per-micro-batch mean would not (transformers #37766).

    With N processes (`ftkit.distributed`): the micro-batches are global ones of
    batch_size × N, each process takes its slice, T is summed over processes, and each
    process's loss is multiplied by N because the engines average gradients over processes
    (`collectives.loss_scale`). Logged loss, tokens and metrics are global sums.

    A step whose loss or gradient norm is not finite applies no update (gradients are
    dropped; weights and optimizer state stay bit-identical). With `on_nonfinite: stop`
    it raises NonFiniteError; with `skip` it counts as a step (data and LR move on) up
    to `max_skips` times. `hooks.should_stop` is asked before every step, so a stop
    request ends the run at a step boundary, where `state` is exactly resumable (with N
    processes, the boundary where any of them was asked to stop: all must stop together).
    """
    hooks = hooks or Hooks()
    objective = objective or SFT()
    params = [p for p in model.parameters() if p.requires_grad]
    rank, world = accelerator.process_index, accelerator.num_processes
    step_size = examples_per_step(cfg, world)
    stream = step_batches(train_examples, step_size, cfg.seed, state, cfg.group_by_length)
    steps_per_epoch = max(1, math.ceil(len(train_examples) / step_size))
    model.train()
    while state.step < total_steps:
        if collectives.any_process(accelerator, hooks.should_stop(state)):
            break
        started = time.perf_counter()
        lr = lr_at(state.step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # a method's relative group LR (LoRA+: B at λ·lr)

        # The step's examples first, then its micro-batches (global ones of batch_size × N; each process
        # takes its slice). The loss normaliser is the unit count of the whole window (of all processes).
        # Each micro-batch has a weight: 0 for a process with no example of it.
        micro = split_step(next(stream), cfg.batch_size * world)
        parts = [collectives.rank_examples(train_examples, indices, rank, world) for indices in micro]
        window = [(objective.collate(part, pad_id), weight) for part, weight in parts]
        local_units = sum(weight * objective.units(batch) for batch, weight in window)
        window_units = max(int(collectives.global_sums(accelerator, [local_units])[0]), 1)
        loss_sum, input_tokens, metric_sums = 0.0, 0, {}
        for i, (batch, weight) in enumerate(window):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with collectives.micro_step(accelerator, model, is_last=i == len(window) - 1):
                with accelerator.autocast():
                    loss, metrics = objective.loss_sum(model, batch)
                    loss = loss * weight / window_units
                collectives.backward(accelerator, loss * collectives.loss_scale(accelerator))
            # `loss` is the data loss; a method's penalty (PENALTY metric) trains but is reported apart
            loss_sum += float(loss.detach()) - weight * float(metrics.get(PENALTY, 0.0)) / window_units
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + weight * float(value) / window_units
            input_tokens += int(weight * int(batch["attention_mask"].sum()))
            state.micro_step += 1
        if world > 1:  # every process must see the same loss: the non-finite check below decides for all
            keys = sorted(metric_sums)
            loss_sum, input_tokens, *sums = collectives.global_sums(
                accelerator, [loss_sum, input_tokens, *(metric_sums[k] for k in keys)]
            )
            input_tokens, metric_sums = int(input_tokens), dict(zip(keys, sums, strict=True))

        window_metrics = getattr(objective, "window_metrics", None)
        if window_metrics is not None:  # an objective's own per-step figures, e.g. the rewards of grpo's rollouts
            extra = window_metrics()
            if world > 1:  # each process's means, averaged over processes
                keys = sorted(extra)
                sums = collectives.global_sums(accelerator, [extra[k] for k in keys])
                extra = {key: total / world for key, total in zip(keys, sums, strict=True)}
            metric_sums |= extra

        grad_norm = collectives.grad_norm(accelerator, params, cfg.max_grad_norm)
        # fp16: an overflow of the scaled gradients is the loss scaler's to handle (it skips the update and
        # lowers the scale); the non-finite guard judges the loss, and the gradients of unscaled training
        scaled = collectives.has_loss_scaler(accelerator)
        is_finite = math.isfinite(loss_sum) and (math.isfinite(grad_norm) or scaled)
        overflowed = False
        if is_finite:
            optimizer.step()
            overflowed = scaled and accelerator.optimizer_step_was_skipped
        if is_finite and not overflowed:
            for hook in hooks.before_zero_grad:
                hook(state.step + 1)
        optimizer.zero_grad(set_to_none=True)
        if not is_finite:
            what = "loss" if not math.isfinite(loss_sum) else "gradient norm"
            state.skipped_steps += cfg.on_nonfinite == "skip"
            if cfg.on_nonfinite == "stop" or state.skipped_steps > cfg.max_skips:
                why = "" if cfg.on_nonfinite == "stop" else f" (more than train.max_skips={cfg.max_skips} skipped)"
                raise NonFiniteError(
                    f"non-finite {what} at step {state.step + 1}{why}; no update applied, the last checkpoint is "
                    "the last good state. Lower train.lr, check the data, use fp32/bf16 instead of fp16, "
                    "or set train.on_nonfinite: skip"
                )
        state.step += 1
        state.tokens_seen += input_tokens
        if is_finite and not overflowed:
            for hook in hooks.after_step:
                hook(state.step)

        elapsed = time.perf_counter() - started
        state.train_s += elapsed
        if not is_finite:  # an event, logged whatever log_every says; no "loss" key keeps it off the curves
            hooks.log(
                {
                    "step": state.step,
                    "epoch": round(state.epoch + state.step_in_epoch / steps_per_epoch, 4),
                    "lr": lr,
                    "skipped": f"non-finite {what}",
                }
            )
        elif overflowed:  # an event too: the scaler skipped this update
            hooks.log(
                {
                    "step": state.step,
                    "epoch": round(state.epoch + state.step_in_epoch / steps_per_epoch, 4),
                    "lr": lr,
                    "skipped": f"fp16 overflow; loss scale now {accelerator.scaler.get_scale():g}",
                }
            )
        else:
            record = {
                "step": state.step,
                "epoch": round(state.epoch + state.step_in_epoch / steps_per_epoch, 4),
                "loss": loss_sum,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": input_tokens,
                "units": window_units,
                "tokens_per_s": input_tokens / max(elapsed, 1e-9),
                "mem_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            } | metric_sums
            hooks.progress(record)
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                hooks.log(record)
        is_last = state.step == total_steps
        if val_examples and ((cfg.eval_every and state.step % cfg.eval_every == 0) or is_last):
            val = evaluate(model, val_examples, cfg.batch_size, pad_id, accelerator.device, objective, accelerator)
            val_loss = val["loss"]
            state.last_val_loss = val_loss
            if state.best_val_loss is None or val_loss < state.best_val_loss:
                state.best_val_loss, state.best_step = val_loss, state.step
            record = {"step": state.step, "epoch": round(state.epoch + state.step_in_epoch / steps_per_epoch, 4)}
            record["val_loss"] = val_loss
            if getattr(objective, "reports_perplexity", True):
                record["val_ppl"] = math.exp(min(val_loss, 50.0))
            record |= {f"val_{key}": value for key, value in val.items() if key != "loss"}
            state.history.append(record)
            hooks.log(record)
        if (cfg.save_every and state.step % cfg.save_every == 0) and not is_last:
            hooks.checkpoint(state)
    return state


def examples_per_step(cfg: TrainSection, processes: int = 1) -> int:
    """Examples one optimizer step trains on: batch_size × grad_accum × processes. The data order is a
    function of this product only, never of how it is split into micro-batches."""
    return cfg.batch_size * cfg.grad_accum * processes


def total_steps_for(cfg: TrainSection, n_examples: int, processes: int = 1) -> int:
    """Optimizer steps the recipe asks for: max_steps, or epochs over the data
    (an epoch is ceil(examples / examples_per_step) steps; its last step may be short)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    steps_per_epoch = math.ceil(n_examples / examples_per_step(cfg, processes))
    return max(1, math.ceil(cfg.epochs * steps_per_epoch))
