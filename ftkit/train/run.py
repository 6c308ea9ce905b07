"""`ftkit train`: recipe → data → model → method → optimizer → loop → run directory.

Everything a run writes lands in its run directory (DESIGN.md's contract). Inputs
are checked before the directory is created, so a bad recipe or data file leaves
nothing behind. One process trains in a run directory at a time (an flock on it).
How a run ends and what each ending leaves: ftkit.train.finish. A resumed run
(`resume=`) continues from a checkpoint as if it had never stopped (ftkit.train.resume);
its summary's wall_s counts the time up to that checkpoint plus the resumed part, not
the work that was redone.
"""

from __future__ import annotations

import time
from pathlib import Path

from ftkit.errors import RunDirError
from ftkit.recipe.schema import Recipe
from ftkit.rundir import METRICS
from ftkit.tasks import task_for
from ftkit.train import resume as resuming
from ftkit.train import setup, trackers
from ftkit.train.checkpointer import Checkpointer
from ftkit.train.finish import Outcome, finish
from ftkit.train.lock import RunLock, removed_on_refusal
from ftkit.train.loop import Hooks, train_loop
from ftkit.train.progress import Records, WallClock, log_to_stderr, no_log
from ftkit.train.signals import StopSignals
from ftkit.train.trackers import Trackers


def run_training(recipe: Recipe, overwrite: bool = False, resume: bool | str | Path = False) -> dict:
    """Train as `recipe` says; return the summary. Raises FtkitError subclasses on failure.

    `resume`: False starts a new run; True continues the run in `output_dir` from its newest
    complete checkpoint; a path continues from that checkpoint (inside the same run).
    """
    if resume and overwrite:
        raise RunDirError("--resume continues a run and --overwrite replaces it; give one of them")
    run_dir, cfg = Path(recipe.output_dir), recipe.train
    trackers.check_installed(cfg.report_to)  # a missing extra must not leave a run directory behind
    started = time.perf_counter()
    accelerator = setup.start_accelerator(recipe)
    is_main = accelerator.is_main_process  # with N processes only the main one writes the run directory
    log = log_to_stderr if is_main else no_log

    # Inputs first: a data error must not leave a run directory behind.
    inputs = setup.prepare_inputs(recipe, accelerator)
    method, config_changes = setup.check_model(recipe, inputs, accelerator)  # before the run dir and any weight

    with RunLock(run_dir) as lock:
        start = setup.open_run_dir(recipe, resume, overwrite, lock, accelerator, inputs.data_sha256, log)
        task = task_for(recipe)
        with removed_on_refusal(run_dir, lock, start.created):  # nothing was trained yet
            trainable = setup.build_trainable(
                recipe, accelerator, inputs, method, config_changes, task, start.resume_from, log
            )
            objective, objective_facts = setup.task_objective(recipe, task, trainable, inputs.splits, accelerator)
            clock = WallClock(started, before=start.wall_s)
            checkpointer = Checkpointer(run_dir, accelerator, trainable, cfg, inputs, clock, start.resumed_step)
            checkpointer.check_free_space()
        state = setup.restored_state(accelerator, start, trainable, inputs.total_steps, log)

        stop = StopSignals()
        tracking = (
            Trackers(cfg.report_to, run_dir, recipe.model_dump(mode="json")) if is_main and cfg.report_to else None
        )
        with Records(run_dir / METRICS if is_main else None, inputs.total_steps, state.step, tracking) as records:
            hooks = Hooks(
                log=records.log,
                progress=records.step,
                checkpoint=checkpointer.save,
                should_stop=stop.should_stop,
                before_zero_grad=trainable.hooks.before_zero_grad,
                after_step=trainable.hooks.after_step,
            )
            if start.resume_from is not None:  # last of all: building the model and optimizer drew from them
                resuming.restore_generators(accelerator, start.resume_from, start.saved)
            outcome = Outcome(
                recipe, accelerator, inputs, trainable, state, stop, checkpointer, start.resumed_step, objective_facts
            )
            with outcome, stop:
                with records.showing():
                    train_loop(
                        trainable.model,
                        trainable.optimizer,
                        inputs.train_examples,
                        inputs.splits.val,
                        cfg,
                        inputs.total_steps,
                        state,
                        accelerator,
                        trainable.tokenizer.pad_token_id,
                        hooks,
                        objective=objective,
                    )
                outcome.method_facts = finish(recipe, accelerator, inputs, trainable, task, state, stop, checkpointer)
        log(outcome.done())
        return outcome.summary
