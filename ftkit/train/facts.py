"""The facts summary.json records about a run: what ran, how far it got, how fast, on what.

report.md and `ftkit report` read them back; the keys and their order are part of the
run-directory contract.
"""

from __future__ import annotations

import resource
from typing import Any

import torch

from ftkit.data import micro_batch_order
from ftkit.data.fingerprint import val_fingerprint_or_none
from ftkit.data.packing import padding_efficiency
from ftkit.plan import mfu
from ftkit.recipe.schema import Recipe
from ftkit.tasks import task_name
from ftkit.train.loop import TrainState, examples_per_step
from ftkit.train.setup import Inputs, Trainable


def run_facts(
    status: str,
    recipe: Recipe,
    inputs: Inputs,
    trainable: Trainable,
    state: TrainState,
    accelerator: Any,
    wall_s: float,
    resumed_from_step: int | None,
    objective_facts: dict,
) -> dict:
    """summary.json's facts: the run, its data and progress, speed, device and geometry, and the objective's."""
    cfg, splits, processes = recipe.train, inputs.splits, accelerator.num_processes
    trainable_params, total_params = trainable.trainable_params, trainable.total_params
    steps_per_epoch = max(1, -(-len(inputs.train_examples) // examples_per_step(cfg, processes)))
    return (
        {
            "status": status,
            "model": recipe.model.name,
            "method": recipe.method.name,
            "task": task_name(recipe),
            # `ftkit compare` compares only runs whose val_loss was measured on the same rows
            "val_sha256": val_fingerprint_or_none(recipe.data, cfg.seed),
            "trainable_params": trainable_params,
            "total_params": total_params,
            "trainable_pct": 100 * trainable_params / max(total_params, 1),
            "train_examples": len(splits.train),
            "val_examples": len(splits.val),
            "truncated": {
                "train": splits.stats.get("truncated_train", 0),
                "val": splits.stats.get("truncated_val", 0),
            },
            "train_target_tokens": splits.stats.get("train_target_tokens"),
            "tokens_seen": state.tokens_seen,
            "steps": state.step,
            "skipped_steps": state.skipped_steps,
            "epochs": state.epoch + state.step_in_epoch / steps_per_epoch,
            "wall_s": wall_s,
            "tokens_per_s": state.tokens_seen / max(wall_s, 1e-9),
            "peak_mem_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        }
        | speed_facts(recipe, inputs.train_examples, state, accelerator.device, processes)
        | {
            "device": device_name(accelerator.device),
            "optimizer": cfg.optimizer,
            "trained_weights": trainable.weights,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "resumed_from_step": resumed_from_step,
            "processes": processes,
            "strategy": recipe.distributed.strategy,
        }
        | objective_facts
    )


def speed_facts(recipe: Recipe, train_examples: list, state: Any, device: Any, processes: int = 1) -> dict:
    """summary.json's speed facts: step-time tokens/s, peak memory (CPU: RSS), MFU on a known GPU,
    and how much of each micro-batch is real tokens (packing efficiency). Tokens/s count every
    process; MFU is per GPU, so it divides them by the `processes` sharing the work."""
    cfg = recipe.train
    lengths = [ex.length for ex in train_examples]
    step_size, micro_size = examples_per_step(cfg, processes), cfg.batch_size * processes
    batches = micro_batch_order(lengths, step_size, micro_size, cfg.seed, 0, cfg.group_by_length) if lengths else []
    train_tokens_per_s = state.tokens_seen / state.train_s if state.train_s > 0 else None
    return {
        "train_tokens_per_s": train_tokens_per_s,
        "train_s": state.train_s,
        # ru_maxrss is in KiB on Linux: the process's peak resident memory, weights included
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "mfu": mfu(recipe, train_tokens_per_s / processes, device) if train_tokens_per_s else None,
        "packing": {
            "enabled": recipe.data.packing,
            "rows": len(train_examples),
            "efficiency": padding_efficiency(lengths, batches),  # real tokens / row tokens, epoch 0
        },
    }


def device_name(device: Any) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
