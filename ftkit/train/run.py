"""`ftkit train`: recipe → data → model → method → optimizer → loop → run directory.

Everything a run writes lands in its run directory (DESIGN.md's contract). Inputs
are checked before the directory is created, so a bad recipe or data file leaves
nothing behind. One process trains in a run directory at a time (an flock on it).

What ends a run, and what it leaves:
    completed          final/, report; exit 0
    SIGINT / SIGTERM   the step in flight finishes, a checkpoint is saved, report; exit 130 / 143
    non-finite         no update applied, nothing saved after it, report names the step; exit 3
    out of memory      one line with the batch geometry, peak memory and the keys that fix it; exit 1
    disk full          staging dropped, last checkpoint intact, path and bytes named; exit 1
A resumed run (`resume=`) continues from a checkpoint as if it had never stopped
(ftkit.train.resume); its summary's wall_s counts the time up to that checkpoint plus
the resumed part, not the work that was redone.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError, Interrupted, ModelError, NonFiniteError, ResourceError, RunDirError
from ftkit.recipe.schema import Recipe
from ftkit.rundir import (
    BASE,
    END_ENTRIES,
    FINAL,
    METRICS,
    RECIPE,
    RUN_ENTRIES,
    SAMPLES,
    TRAINER_STATE,
    has_completed,
    is_eval_file,
)


class RunLock:
    """An exclusive, non-blocking flock on the run directory, held for the whole run.

    Two trainers in one run directory (a job resubmitted while the first still runs) would
    interleave checkpoints and metrics; the second is refused instead. The lock dies with
    the process, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no flock; one trainer per run dir is then the user's care
            return
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunDirError(
                f"output_dir: another ftkit process is training in {self.run_dir}; wait for it or stop it first"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def prepare_run_dir(run_dir: Path, overwrite: bool, lock: RunLock) -> bool:
    """Refuse a non-empty run directory unless --overwrite; then remove only ftkit's own entries.

    Takes `lock` before anything is removed. Returns True when the directory was created
    here (so a run that cannot start may remove it again).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output_dir: {run_dir} exists and is not a directory")
    existing = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if existing and not overwrite:
        raise RunDirError(
            f"output_dir: {run_dir} is not empty ({', '.join(existing[:5])}{' …' if len(existing) > 5 else ''}); "
            "pass --overwrite to replace ftkit's files there, --resume to continue it, or --output-dir for a new run"
        )
    ours = [name for name in existing if name in RUN_ENTRIES]
    if ours and RECIPE not in existing:
        raise RunDirError(
            f"output_dir: {run_dir} is not an ftkit run directory (no recipe.yaml) but holds {', '.join(ours)}; "
            "--overwrite replaces only runs ftkit made: choose another --output-dir"
        )
    foreign = [name for name in existing if name not in RUN_ENTRIES and not is_eval_file(name)]
    if existing and foreign:
        print(f"note: --overwrite keeps files ftkit did not make in {run_dir}: {', '.join(foreign)}", file=sys.stderr)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    for name in ours:
        _remove(run_dir / name)
    return created


def _remove(path: Path) -> None:
    """Remove a run entry; a symlink is unlinked, never followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def load_tokenizer(recipe: Recipe) -> Any:
    from ftkit.models.load import is_builtin, load_tokenizer_only

    if is_builtin(recipe.model.name):
        from ftkit.models.builtin import build_byte_tokenizer

        return build_byte_tokenizer()
    return load_tokenizer_only(recipe.model)


def run_training(recipe: Recipe, overwrite: bool = False, resume: bool | str | Path = False) -> dict:
    """Train as `recipe` says; return the summary. Raises FtkitError subclasses on failure.

    `resume`: False starts a new run; True continues the run in `output_dir` from its newest
    complete checkpoint; a path continues from that checkpoint (inside the same run).
    """
    if resume and overwrite:
        raise RunDirError("--resume continues a run and --overwrite replaces it; give one of them")
    import torch
    from accelerate.utils import set_seed

    from ftkit.data import load_splits
    from ftkit.data.packing import pack_examples
    from ftkit.distributed import collectives, engines
    from ftkit.distributed.state import check_processes, gathered, rank_rng_states, restore_rank_rng
    from ftkit.methods import RunInfo, get_method
    from ftkit.models.load import build_model, check_attention, compile_layers, count_parameters, load_model_config
    from ftkit.recipe import dump_recipe, load_recipe
    from ftkit.report import write_report
    from ftkit.tasks import task_for
    from ftkit.tasks.losses import check_kernels
    from ftkit.tasks.objective import Regularized
    from ftkit.train import resume as resuming
    from ftkit.train.checkpoint import (
        DISK_FULL,
        clean_staging,
        disk_full_error,
        estimate_checkpoint_bytes,
        free_bytes,
        load_method_state,
        restore_rng,
        rotate,
        save_checkpoint,
        save_weights,
        verify_checkpoint,
    )
    from ftkit.train.faults import fault_point
    from ftkit.train.loop import Hooks, TrainState, total_steps_for, train_loop
    from ftkit.train.optim import build_optimizer
    from ftkit.train.progress import Progress
    from ftkit.train.signals import StopSignals, exit_code

    run_dir = Path(recipe.output_dir)
    cfg = recipe.train
    started = time.perf_counter()
    accelerator = engines.build_accelerator(recipe, _mixed_precision(cfg.mixed_precision))
    device_type = accelerator.device.type
    is_main = accelerator.is_main_process  # with N processes only the main one writes the run directory
    set_seed(cfg.seed)
    log = _stderr_logger() if is_main else (lambda message: None)

    # Inputs first: a data error must not leave a run directory behind.
    tokenizer = load_tokenizer(recipe)
    splits = load_splits(recipe.data, tokenizer, cfg.seed)
    data_sha256 = resuming.data_hashes(recipe.data)
    train_examples = splits.train
    if recipe.data.packing:
        train_examples, _ = pack_examples(splits.train, recipe.data.max_length, cfg.seed)
    total_steps = total_steps_for(cfg, len(train_examples), accelerator.num_processes)
    check_kernels(recipe.perf.kernels, device_type)
    check_attention(recipe.model, device_type)
    _warn_if_plan_exceeds_device(recipe, device_type)

    method = get_method(recipe.method.name)
    model_config = load_model_config(recipe.model)
    problems = method.model_problems(recipe.method, model_config)
    if problems:  # before the run directory and before any weight is loaded
        raise ModelError("\n".join(problems) if len(problems) > 1 else problems[0])
    config_changes = method.model_config_changes(recipe.method, model_config)

    with RunLock(run_dir) as lock:
        resume_from, saved, created = None, {}, False
        if resume:
            resume_from = resuming.find_checkpoint(run_dir, None if resume is True else Path(resume))
            if is_main:
                lock.acquire()
            if resume is True and has_completed(run_dir):
                raise RunDirError(
                    f"--resume: {run_dir} has finished (final/ is written); to train again from a checkpoint "
                    f"name it (--resume {resume_from}), or start a new run with --overwrite"
                )
            if is_main:
                verify_checkpoint(resume_from)
            saved = json.loads((resume_from / TRAINER_STATE).read_text())
            check_processes(accelerator, saved)
            old = load_recipe(run_dir / RECIPE)
            for note in resuming.check_recipe_change(old, recipe, saved.get("data_sha256", {}), data_sha256):
                log(f"note: resuming with {note}")
            accelerator.wait_for_everyone()  # every process has read the run before the main one changes it
            if is_main:
                clean_staging(run_dir)
                resuming.truncate_metrics(run_dir / METRICS, int(saved["step"]))
                for name in END_ENTRIES:
                    _remove(run_dir / name)
        elif is_main:
            created = prepare_run_dir(run_dir, overwrite, lock)
        if is_main:
            (run_dir / RECIPE).write_text(dump_recipe(recipe))
        with accelerator.main_process_first():  # a built-in base is written once, by the main process
            model_cfg = _model_source(accelerator, recipe.model, run_dir / BASE)
            model, tokenizer, base = build_model(
                model_cfg,
                device_type,
                cfg.seed,
                base_dir=run_dir / BASE,
                tokenizer=tokenizer,
                labels=splits.labels,
                config_changes=config_changes,
            )
        task = task_for(recipe)
        run_info = RunInfo(
            total_steps=total_steps,
            train=cfg,
            examples=splits.train,
            pad_id=tokenizer.pad_token_id,
            device=accelerator.device,
            run_dir=run_dir,
            resume_from=resume_from,
            max_length=recipe.data.max_length,
            objective=task.scoring_objective(recipe),
            build_optimizer=build_optimizer,
        )
        set_seed(cfg.seed)  # adapter init must not depend on how many random numbers loading drew
        model = method.apply(model, recipe.method, run_info)
        method_hooks = method.hooks(model, recipe.method, run_info)
        engines.check_method_hooks(accelerator, recipe, method_hooks)
        if recipe.model.torch_compile:
            compile_layers(model)
        trainable, total = count_parameters(model)
        log(
            f"{recipe.model.name} · {recipe.method.name} · trainable {trainable:,} of {total:,} params "
            f"({100 * trainable / max(total, 1):.2f}%) · {len(splits.train)} train / {len(splits.val)} val examples"
            f"{f' in {len(train_examples)} packed rows' if recipe.data.packing else ''} · "
            f"{total_steps} steps · {accelerator.device}{engines.describe(accelerator, recipe)}"
        )
        if method_hooks.optimizer is not None:
            optimizer = method_hooks.optimizer(cfg)
        else:
            optimizer = build_optimizer(
                method_hooks.param_groups or [p for p in model.parameters() if p.requires_grad], cfg
            )
        model, optimizer = engines.prepare(accelerator, recipe, model, optimizer)
        unwrapped = accelerator.unwrap_model(model)
        with collectives.own_dir(accelerator, run_dir) as where:  # files it writes: the main process's only
            objective, objective_facts = task.objective(
                recipe, unwrapped, splits, where, accelerator.device, tokenizer.pad_token_id
            )
        if method_hooks.regularizer is not None:
            objective = Regularized(objective, method_hooks.regularizer)
        checkpoint_size = estimate_checkpoint_bytes(unwrapped, cfg.optimizer)
        try:
            if is_main:
                _check_free_space(run_dir, checkpoint_size, cfg, free_bytes(run_dir))
        except ResourceError:
            lock.release()  # before removing the directory it locks
            if created:  # nothing was trained yet: leave no half-made run directory
                shutil.rmtree(run_dir, ignore_errors=True)
            raise

        state = TrainState()
        if resume_from is not None:
            resuming.restore(accelerator, resume_from, model, optimizer)  # shard-aware
            state = resuming.state_from(saved)
            if method_hooks.load_state is not None:
                method_hooks.load_state(load_method_state(resume_from))
            log(f"resuming from {resume_from}: step {state.step} of {total_steps}, epoch {state.epoch}")
        wall_before = float(saved.get("wall_s", 0.0))
        last_saved = {"step": state.step if resume_from is not None else None}
        # line-buffered: a crash loses one line at most
        metrics = (run_dir / METRICS).open("a", buffering=1) if is_main else None

        def trainer_state(s: TrainState) -> dict:
            return s.to_dict() | {
                "total_steps": total_steps,
                "data_sha256": data_sha256,
                "wall_s": wall_before + time.perf_counter() - started,
            }

        def checkpoint(s: TrainState) -> None:
            _assert_finite(unwrapped)
            to_save, optimizer_to_save = gathered(accelerator, model, optimizer)  # every process
            rng_ranks = rank_rng_states(accelerator)  # every process
            if is_main:
                extra = trainer_state(s) | rng_ranks
                method_state = method_hooks.state() if method_hooks.state is not None else None
                save_checkpoint(run_dir, to_save, tokenizer, optimizer_to_save, extra, checkpoint_size, method_state)
                rotate(run_dir, cfg.keep_last, s.best_step)
            accelerator.wait_for_everyone()
            last_saved["step"] = s.step

        stop = StopSignals()

        def should_stop(s: TrainState) -> bool:
            fault_point("step", s.step)  # test-only fault injection (FTKIT_TEST_FAULT); a no-op otherwise
            return stop.requested

        progress = Progress(total_steps, start_step=state.step) if is_main else contextlib.nullcontext()
        hooks = Hooks(
            log=(lambda r: (metrics.write(json.dumps(r) + "\n"), progress.update(r))) if is_main else (lambda r: None),
            checkpoint=checkpoint,
            should_stop=should_stop,
            before_zero_grad=method_hooks.before_zero_grad,
            after_step=method_hooks.after_step,
        )
        status = "completed"
        if resume_from is not None:
            # last of all: building the model and optimizer above drew from the generators
            from safetensors.torch import load_file

            restore_rng(load_file(resume_from / "rng.safetensors"), saved["rng"])
            restore_rank_rng(accelerator, saved)  # each process's own torch generators
        try:
            with stop:
                try:
                    with progress:
                        train_loop(
                            model,
                            optimizer,
                            train_examples,
                            splits.val,
                            cfg,
                            total_steps,
                            state,
                            accelerator,
                            tokenizer.pad_token_id,
                            hooks,
                            objective=objective,
                        )
                    if state.step < total_steps:  # a signal stopped the loop at a step boundary
                        if last_saved["step"] != state.step:
                            checkpoint(state)
                        status = f"interrupted by {stop.name} at step {state.step}"
                        raise Interrupted(
                            f"{stop.name} at step {state.step} of {total_steps}; saved {run_dir}/checkpoints/"
                            f"step-{state.step}; continue with: ftkit train {run_dir}/recipe.yaml --resume",
                            exit_code(stop.signum),
                        )
                    _assert_finite(unwrapped)
                    to_save, _ = gathered(accelerator, model)  # every process
                    if is_main and method_hooks.save_final is not None:
                        method_hooks.save_final(unwrapped, run_dir / FINAL)  # never sharded: check_method_hooks
                        tokenizer.save_pretrained(run_dir / FINAL)
                    elif is_main:
                        save_weights(to_save, tokenizer, run_dir / FINAL)
                    if is_main and base is not None and recipe.method.is_adapter:
                        _point_adapter_to(run_dir / FINAL, base)
                    # every process generates (a sharded model gathers in forward), so all must agree
                    if (
                        task.generates_text
                        and cfg.samples
                        and splits.val
                        and not collectives.any_process(accelerator, stop.requested)
                    ):
                        device = accelerator.device
                        _write_samples(unwrapped, tokenizer, recipe, splits.val, run_dir, device, write=is_main)
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if not _is_out_of_memory(err):
                        raise
                    status = f"out of memory at step {state.step + 1}"
                    raise ResourceError(_oom_message(recipe, state, splits, accelerator.device)) from None
                except OSError as err:
                    if err.errno not in DISK_FULL:
                        raise
                    status = f"disk full at step {state.step}"
                    raise disk_full_error(run_dir, str(err.filename or run_dir), checkpoint_size) from None
        except NonFiniteError as err:
            status = f"stopped: {err}"
            raise
        except ResourceError as err:
            if status == "completed":  # a full disk inside save_checkpoint
                status = f"stopped at step {state.step}: {err}"
            raise
        except BaseException as err:
            if status == "completed":
                status = f"failed at step {state.step}: {type(err).__name__}: {err}"
            raise
        finally:
            if metrics is not None:
                metrics.close()
            wall_s = wall_before + time.perf_counter() - started
            facts = (
                {
                    "status": status,
                    "model": recipe.model.name,
                    "method": recipe.method.name,
                    "trainable_params": trainable,
                    "total_params": total,
                    "trainable_pct": 100 * trainable / max(total, 1),
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
                    "epochs": state.epoch
                    + state.batch_in_epoch
                    / max(1, -(-len(train_examples) // (cfg.batch_size * accelerator.num_processes))),
                    "wall_s": wall_s,
                    "tokens_per_s": state.tokens_seen / max(wall_s, 1e-9),
                    "peak_mem_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                }
                | speed_facts(recipe, train_examples, state, accelerator.device, accelerator.num_processes)
                | {
                    "device": _device_name(accelerator.device),
                    "optimizer": cfg.optimizer,
                    "lr": cfg.lr,
                    "batch_size": cfg.batch_size,
                    "grad_accum": cfg.grad_accum,
                    "resumed_from_step": int(saved["step"]) if resume_from is not None else None,
                    "processes": accelerator.num_processes,
                    "strategy": recipe.distributed.strategy,
                }
                | objective_facts
            )
            try:
                summary = write_report(run_dir, facts) if is_main else {}
            except OSError as err:  # e.g. the disk filled up: never hide the failure that brought us here
                log(f"warning: could not write the report in {run_dir}: {err}")
                summary = {}
        loss, val_loss = summary.get("final_loss"), summary.get("final_val_loss")
        log(f"done in {wall_s:.0f}s · loss {loss} · val_loss {val_loss} · {run_dir}")
        return summary


def _check_free_space(run_dir: Path, checkpoint_bytes: int, cfg: Any, free: int) -> None:
    """Pre-flight: room for keep_last + 1 checkpoints at once (rotation runs after a save) and final/."""
    copies = cfg.keep_last + 1 if cfg.save_every else 0
    needed = checkpoint_bytes * (copies + 1)
    if needed > free:
        raise ResourceError(
            f"{run_dir}: not enough disk space: about {needed:,} bytes needed ({copies} checkpoints of "
            f"~{checkpoint_bytes:,} bytes at once with train.keep_last={cfg.keep_last}, plus final/), "
            f"{free:,} free; free some space, lower train.keep_last, or choose another --output-dir"
        )


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    # CPU allocation failures are plain RuntimeErrors with this allocator message
    return isinstance(err, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(err)


def _oom_message(recipe: Recipe, state: Any, splits: Any, device: Any) -> str:
    """One line: where, the micro-batch geometry, peak memory, and the recipe keys that make it fit."""
    import resource

    import torch

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


def speed_facts(recipe: Recipe, train_examples: list, state: Any, device: Any, processes: int = 1) -> dict:
    """summary.json's speed facts: step-time tokens/s, peak memory (CPU: RSS), MFU on a known GPU,
    and how much of each micro-batch is real tokens (packing efficiency). Tokens/s count every
    process; MFU is per GPU, so it divides them by the `processes` sharing the work."""
    import resource

    from ftkit.data import batch_order
    from ftkit.data.packing import padding_efficiency
    from ftkit.plan import mfu

    cfg = recipe.train
    lengths = [ex.length for ex in train_examples]
    batches = batch_order(lengths, cfg.batch_size, cfg.seed, 0, cfg.group_by_length) if lengths else []
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


def _warn_if_plan_exceeds_device(recipe: Recipe, device_type: str) -> None:
    """Before any weight is loaded: warn when `ftkit plan` expects more memory than the GPU has."""
    if device_type != "cuda":
        return
    import torch

    from ftkit.plan import memory_warning

    capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    warning = memory_warning(recipe, capacity)
    if warning:
        print(warning, file=sys.stderr)


def _mixed_precision(name: str) -> str:
    import torch

    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def _model_source(accelerator: Any, model_cfg: Any, run_base: Path) -> Any:
    """The model section this process loads: a built-in model is written once, by the main
    process, into the run's base/ (transformers saves on rank 0 only); the others load that
    directory. Call inside `accelerator.main_process_first()`."""
    from ftkit.models.builtin import is_builtin

    if accelerator.is_main_process or not is_builtin(model_cfg.name):
        return model_cfg
    return model_cfg.model_copy(update={"name": str(run_base)})


def _assert_finite(model: Any) -> None:
    import torch

    from ftkit.distributed.collectives import local_tensor

    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(local_tensor(param)).all():
            raise NonFiniteError(f"trainable parameter {name} is not finite; nothing was saved")


def _point_adapter_to(adapter_dir: Path, base: str) -> None:
    """Record where the base lives, so `PeftModel.from_pretrained` needs no guess."""
    config_file = adapter_dir / "adapter_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = base
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def _write_samples(
    model: Any, tokenizer: Any, recipe: Recipe, val: list, run_dir: Path, device: Any, write: bool = True
) -> None:
    """Greedy completions for the first `train.samples` validation examples, for report.md
    (written when `write`: every process generates, the main one writes)."""
    import torch

    from ftkit.data import read_rows, render_prompt

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


def _stderr_logger():
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    return log


__all__ = ["run_training", "prepare_run_dir", "RunLock", "FtkitError", "RUN_ENTRIES"]
