"""The end of a run: what it leaves, whatever ended it.

completed          final/ (an adapter records where its base lives), samples.jsonl, report; exit 0
SIGINT / SIGTERM   a checkpoint at the step reached, report; Interrupted, exit 130 / 143
non-finite         nothing saved after it, report names the step; exit 3
out of memory      one line with the batch geometry, peak memory and the keys that fix it; exit 1
disk full          the path and the bytes named, the last checkpoint intact; exit 1
anything else      report names it; the error goes on
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
from pathlib import Path
from typing import Any

import torch

from ftkit.data import read_rows, render_prompt
from ftkit.distributed import collectives
from ftkit.distributed.state import gathered
from ftkit.errors import Interrupted, NonFiniteError, ResourceError
from ftkit.models import hf_files
from ftkit.recipe.schema import Recipe
from ftkit.report import write_report
from ftkit.rundir import CHECKPOINTS, FINAL, RECIPE, SAMPLES
from ftkit.tasks import Task
from ftkit.train.checkpoint import DISK_FULL, disk_full_error, save_weights
from ftkit.train.checkpointer import Checkpointer, assert_finite
from ftkit.train.facts import run_facts
from ftkit.train.loop import TrainState
from ftkit.train.progress import duration, human, log_to_stderr
from ftkit.train.setup import Inputs, Trainable
from ftkit.train.signals import StopSignals, exit_code


def finish(
    recipe: Recipe,
    accelerator: Any,
    inputs: Inputs,
    trainable: Trainable,
    task: Task,
    state: TrainState,
    stop: StopSignals,
    checkpointer: Checkpointer,
) -> dict | None:
    """After the loop: a run a signal stopped saves a checkpoint and raises Interrupted;
    a completed one writes final/ and the samples, and returns the method's facts (MethodHooks.facts)
    about the trained model, or None."""
    run_dir = Path(recipe.output_dir)
    if state.step < inputs.total_steps:  # a signal stopped the loop at a step boundary
        checkpointer.save_unless_saved(state)
        raise Interrupted(
            f"{stop.name} at step {state.step} of {inputs.total_steps}; saved {run_dir}/{CHECKPOINTS}/"
            f"step-{state.step}; continue with: ftkit train {run_dir}/{RECIPE} --resume",
            exit_code(stop.signum),
        )
    save_final(recipe, accelerator, trainable)
    method_facts = trainable.hooks.facts() if trainable.hooks.facts is not None else None
    # every process generates (a sharded model gathers in forward), so all must agree
    splits = inputs.splits
    if (
        task.generates_text
        and recipe.train.samples
        and splits.val
        and not collectives.any_process(accelerator, stop.requested)
    ):
        write_samples(
            trainable.unwrapped,
            trainable.tokenizer,
            recipe,
            splits.val,
            run_dir,
            accelerator.device,
            write=accelerator.is_main_process,
        )
    return method_facts


def save_final(recipe: Recipe, accelerator: Any, trainable: Trainable) -> None:
    """final/: the adapter or the whole model and the tokenizer (the method's own save when it has
    one); an adapter records the base it was trained on."""
    final = Path(recipe.output_dir) / FINAL
    assert_finite(trainable.unwrapped)
    to_save, _ = gathered(accelerator, trainable.model)  # every process
    if not accelerator.is_main_process:
        return
    if trainable.hooks.save_final is not None:
        trainable.hooks.save_final(trainable.unwrapped, final)  # never sharded: check_method_hooks
        trainable.tokenizer.save_pretrained(final)
    else:
        save_weights(to_save, trainable.tokenizer, final)
    if trainable.base is not None and recipe.method.is_adapter and hf_files.has_adapter_config(final):
        hf_files.point_adapter_to(final, trainable.base)


def write_samples(
    model: Any, tokenizer: Any, recipe: Recipe, val: list, run_dir: Path, device: Any, write: bool = True
) -> None:
    """Greedy completions for the first `train.samples` validation examples, for report.md
    (written when `write`: every process generates, the main one writes)."""
    by_source = {source: row for row, source in read_rows(recipe.data.val or recipe.data.train)}
    rows = [by_source[example.source] for example in val[: recipe.train.samples]]
    model.eval()
    sink = (run_dir / SAMPLES).open("w") if write else contextlib.nullcontext(io.StringIO())
    with sink as out, torch.no_grad():
        for row in rows:
            prompt, target = render_prompt(row, recipe.data.format, tokenizer)
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
            budget = len(tokenizer(target, add_special_tokens=False).input_ids) + 16
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=budget,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            text = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
            out.write(json.dumps({"prompt": prompt, "target": target, "generated": text.strip()}) + "\n")


class Outcome:
    """How the run ended (summary.json's `status`) and the report that says so.

    `with outcome:` around the training. On the way out, whatever ended it: an out-of-memory
    error becomes one line naming the micro-batch geometry, the peak memory and the recipe keys
    that make it fit, a full disk one line naming the path and the bytes (ResourceError, no
    traceback); the status is recorded; summary.json and report.md are written (main process),
    and a failure to write them never hides the error that brought us there.
    """

    def __init__(
        self,
        recipe: Recipe,
        accelerator: Any,
        inputs: Inputs,
        trainable: Trainable,
        state: TrainState,
        stop: StopSignals,
        checkpointer: Checkpointer,
        resumed_from_step: int | None,
        objective_facts: dict,
    ):
        self.recipe, self.accelerator, self.inputs, self.trainable = recipe, accelerator, inputs, trainable
        self.state, self.stop, self.checkpointer = state, stop, checkpointer
        self.resumed_from_step, self.objective_facts = resumed_from_step, objective_facts
        self.run_dir = Path(recipe.output_dir)
        self.status = "completed"
        self.wall_s = 0.0
        self.summary: dict = {}
        self.method_facts: dict | None = None  # set from finish(): MethodHooks.facts of a completed run

    def __enter__(self) -> Outcome:
        return self

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> None:
        translated = self._translated(err) if err is not None else None
        if err is not None:
            self.status = self._status(translated or err)
        self.wall_s = self.checkpointer.clock.seconds()
        facts = run_facts(
            self.status,
            self.recipe,
            self.inputs,
            self.trainable,
            self.state,
            self.accelerator,
            self.wall_s,
            self.resumed_from_step,
            self.objective_facts,
        )
        if self.method_facts:
            facts["method_facts"] = self.method_facts
        try:
            self.summary = write_report(self.run_dir, facts) if self.accelerator.is_main_process else {}
        except OSError as report_err:  # e.g. the disk filled up: never hide the failure that brought us here
            log_to_stderr(f"warning: could not write the report in {self.run_dir}: {report_err}")
            self.summary = {}
        if translated is not None:
            raise translated from None

    def done(self) -> str:
        """The run's last line."""
        loss, val_loss = self.summary.get("final_loss"), self.summary.get("final_val_loss")
        return f"done in {duration(self.wall_s)} · loss {human(loss)} · val_loss {human(val_loss)} · {self.run_dir}"

    def _translated(self, err: BaseException) -> ResourceError | None:
        """The one-line error for an out-of-memory or full-disk failure; None for any other."""
        if is_out_of_memory(err):
            self.status = f"out of memory at step {self.state.step + 1}"
            return ResourceError(oom_message(self.recipe, self.state, self.inputs.splits, self.accelerator.device))
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            self.status = f"disk full at step {self.state.step}"
            return disk_full_error(self.run_dir, str(err.filename or self.run_dir), self.checkpointer.size)
        return None

    def _status(self, err: BaseException) -> str:
        step = self.state.step
        if isinstance(err, NonFiniteError):
            return f"stopped: {err}"
        if isinstance(err, Interrupted):
            return f"interrupted by {self.stop.name} at step {step}"
        if self.status != "completed":  # out of memory, disk full: named where it was translated
            return self.status
        if isinstance(err, ResourceError):  # a full disk inside save_checkpoint
            return f"stopped at step {step}: {err}"
        return f"failed at step {step}: {type(err).__name__}: {err}"


def is_out_of_memory(err: BaseException) -> bool:
    # CPU allocation failures are plain RuntimeErrors with this allocator message
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(err)
    )


def oom_message(recipe: Recipe, state: TrainState, splits: Any, device: Any) -> str:
    """One line: where, the micro-batch geometry, peak memory, and the recipe keys that make it fit."""
    cfg = recipe.train
    longest = max((ex.length for ex in splits.train), default=0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        memory = f"peak {peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB on {device}"
    else:  # Linux reports ru_maxrss in KiB
        memory = f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB resident on cpu"
    return (
        f"out of memory at step {state.step + 1}: micro-batch of train.batch_size={cfg.batch_size} examples "
        f"× up to {longest} tokens (data.max_length={recipe.data.max_length}), {memory}; to fit: "
        f"train.batch_size={max(1, cfg.batch_size // 2)} with train.grad_accum={cfg.grad_accum * 2} "
        "(same examples per step), model.gradient_checkpointing: true, or method.name: qlora (4-bit base)"
    )
