"""The run's checkpoint writer: what `Hooks.checkpoint` calls, and the disk space it needs.

The file format (atomic, self-describing, pickle-free) is ftkit.train.checkpoint's; this
module decides what goes into each save and when: every process gathers its part of the
state, the main process writes `checkpoints/step-N/` and rotates the old ones out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ftkit.distributed import collectives
from ftkit.distributed.state import gathered, rank_rng_states
from ftkit.errors import NonFiniteError, ResourceError
from ftkit.recipe.schema import TrainSection
from ftkit.rundir import FINAL
from ftkit.train import checkpoint
from ftkit.train.loop import TrainState
from ftkit.train.progress import WallClock
from ftkit.train.setup import Inputs, Trainable


class Checkpointer:
    """Writes the checkpoints of one run and remembers the last step it saved.

    Each save carries, besides the model, the optimizer and the RNG states, the trainer
    state (the loop's counters, total steps, data hashes, the wall time so far) and the
    method's own state, if any. `size` is the estimated size of one checkpoint, before any
    was written: the pre-flight disk check and a full-disk message name it.
    """

    def __init__(
        self,
        run_dir: Path,
        accelerator: Any,
        trainable: Trainable,
        train: TrainSection,
        inputs: Inputs,
        clock: WallClock,
        last_saved: int | None = None,
    ):
        self.run_dir = run_dir
        self.accelerator = accelerator
        self.trainable = trainable
        self.train = train
        self.total_steps = inputs.total_steps
        self.data_sha256 = inputs.data_sha256
        self.clock = clock
        self.last_saved = last_saved  # the step of the newest checkpoint this run wrote or resumed from
        self.size = checkpoint.estimate_checkpoint_bytes(trainable.unwrapped, train.optimizer)

    def check_free_space(self) -> None:
        """Pre-flight (main process): room for keep_last + 1 checkpoints at once (rotation runs
        after a save) and final/; ResourceError naming the bytes needed and free otherwise."""
        if not self.accelerator.is_main_process:
            return
        free = checkpoint.free_bytes(self.run_dir)
        copies = self.train.keep_last + 1 if self.train.save_every else 0
        needed = self.size * (copies + 1)
        if needed > free:
            raise ResourceError(
                f"{self.run_dir}: not enough disk space: about {needed:,} bytes needed ({copies} checkpoints of "
                f"~{self.size:,} bytes at once with train.keep_last={self.train.keep_last}, plus {FINAL}/), "
                f"{free:,} free; free some space, lower train.keep_last, or choose another --output-dir"
            )

    def trainer_state(self, state: TrainState) -> dict:
        """trainer_state.json of a checkpoint at `state` (the RNG states are added when it is written)."""
        return state.to_dict() | {
            "total_steps": self.total_steps,
            "data_sha256": self.data_sha256,
            "wall_s": self.clock.seconds(),
        }

    def save(self, state: TrainState) -> None:
        """`Hooks.checkpoint`: called on every process, which all gather; the main one writes."""
        trainable, accelerator = self.trainable, self.accelerator
        assert_finite(trainable.unwrapped)
        to_save, optimizer_to_save = gathered(accelerator, trainable.model, trainable.optimizer)
        rng_ranks = rank_rng_states(accelerator)  # every process
        if accelerator.is_main_process:
            extra = self.trainer_state(state) | rng_ranks
            method_state = trainable.hooks.state() if trainable.hooks.state is not None else None
            checkpoint.save_checkpoint(
                self.run_dir, to_save, trainable.tokenizer, optimizer_to_save, extra, self.size, method_state
            )
            checkpoint.rotate(self.run_dir, self.train.keep_last, state.best_step)
        accelerator.wait_for_everyone()
        self.last_saved = state.step

    def save_unless_saved(self, state: TrainState) -> None:
        """A checkpoint at `state`, unless the last one this run wrote (or resumed from) is at its step."""
        if self.last_saved != state.step:
            self.save(state)


def assert_finite(model: Any) -> None:
    """NonFiniteError naming the first trainable parameter (this process's shard of it) that holds a NaN or inf."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(collectives.local_tensor(param)).all():
            raise NonFiniteError(f"trainable parameter {name} is not finite; nothing was saved")
