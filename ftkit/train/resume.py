"""Resuming a run exactly where a checkpoint left it.

    find_checkpoint(run_dir, path)      the newest complete checkpoint, or the one named (inside the run)
    reopen(run_dir, resume, ...)        a run opened to continue it: checked, and put back as it was then
    check_recipe_change(old, new, ...)  refuse changed trajectory keys (naming them); notes for cadence keys
    data_hashes(data)                   sha256 of the data files, stored in every checkpoint
    truncate_metrics(path, step)        metrics.jsonl as the uninterrupted run had it at `step`
    restore(accelerator, path, model, optimizer)  weights + optimizer state, shard-aware; returns trainer_state.json
    state_from(saved)                   the TrainState counters (step, data position, evals, skips)
    restore_generators(acc, path, ...)  every random generator as it was at the checkpoint (last of all)

What makes the continuation bit-identical to an uninterrupted run (CPU, fp32):
- data order is `batch_order(seed, epoch, examples per step)` plus the stored (epoch, step_in_epoch)
  position; batch_size and grad_accum may change if their product stays (the same steps, other micro-batches);
- the LR is `lr_at(step)`, a pure function of the stored step (no scheduler object to drift);
- weights and optimizer state come back from safetensors in their own dtypes;
- python, numpy, torch CPU and CUDA generator states are restored as they were between the
  two steps (dropout draws from them); `restore_rng` must run last, after model building.
Anything that would change the trajectory (model, method, data, seed, batch geometry,
optimizer, schedule) makes a resume refuse; cadence keys (eval_every, save_every, ...) may change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ftkit.distributed.collectives import is_deepspeed, is_sharded
from ftkit.distributed.state import check_processes, restore_deepspeed, restore_rank_rng, restore_sharded
from ftkit.errors import RunDirError
from ftkit.io import file_sha256
from ftkit.models.hf_files import load_tensors
from ftkit.recipe import load_recipe
from ftkit.recipe.schema import DataSection, Recipe
from ftkit.rundir import (
    CHECKPOINTS,
    END_ENTRIES,
    FINAL,
    METRICS,
    RECIPE,
    TRAINER_STATE,
    complete_checkpoints,
    ensure_inside,
    has_completed,
    is_complete,
)
from ftkit.train.checkpoint import (
    RNG,
    clean_staging,
    load_optimizer_state,
    load_weights,
    restore_rng,
    verify_checkpoint,
)
from ftkit.train.lock import RunLock, remove_entry
from ftkit.train.loop import TrainState

#: keys that change how often ftkit evaluates, saves, logs or reports, or what it does after a
#: non-finite step, but not the weights a step produces: allowed on resume, with a note
CADENCE_KEYS = frozenset(
    {
        "train.eval_every",
        "train.save_every",
        "train.keep_last",
        "train.log_every",
        "train.samples",
        "train.on_nonfinite",
        "train.max_skips",
        "train.report_to",
    }
)
#: data files are compared by content (sha256): a moved file with the same bytes is the same data
DATA_FILE_KEYS = ("data.train", "data.val")
#: where the run lives is not part of what it computes
IGNORED_KEYS = frozenset({"output_dir"})
#: keys whose product is the examples per optimizer step: they may change together if it stays
GEOMETRY_KEYS = ("train.batch_size", "train.grad_accum")


def find_checkpoint(run_dir: Path, path: Path | None = None) -> Path:
    """The checkpoint to resume from: `path` if given, else the newest complete one in the run.

    RunDirError when the run has none, or `path` is not a complete `step-N` checkpoint
    directly inside `run_dir/checkpoints` (symlinks refused: derived paths stay in the run).
    """
    if not (run_dir / RECIPE).is_file():
        raise RunDirError(f"--resume: {run_dir} holds no ftkit run (no {RECIPE}); check output_dir or --output-dir")
    ensure_inside(run_dir, run_dir / CHECKPOINTS)
    if path is None:
        found = complete_checkpoints(run_dir)
        if not found:
            raise RunDirError(
                f"--resume: no complete checkpoint in {run_dir / CHECKPOINTS} (set train.save_every to write them); "
                "start again with --overwrite"
            )
        return found[-1]
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(
            f"--resume: {path} is not a directory; give a checkpoint such as {run_dir / CHECKPOINTS}/step-N"
        )
    if path.is_symlink() or path.resolve().parent != (run_dir / CHECKPOINTS).resolve():
        raise RunDirError(
            f"--resume: {path} is not a checkpoint of the run directory {run_dir}; "
            f"resume the run it belongs to with --output-dir {path.parent.parent}"
        )
    if not is_complete(path):
        raise RunDirError(
            f"--resume: {path} is not a complete ftkit checkpoint (no complete.json: the save did not finish); "
            "omit the path to take the newest complete one"
        )
    return path


def reopen(
    run_dir: Path,
    resume: bool | str | Path,
    recipe: Recipe,
    lock: RunLock,
    accelerator: Any,
    data_sha256: dict[str, str | None],
    log: Callable[[str], None],
) -> tuple[Path, dict]:
    """Open the run in `run_dir` to continue it: (the checkpoint to resume from, its trainer_state.json).

    `resume` is True (the newest complete checkpoint; refused when the run has finished) or
    a checkpoint's path. Refuses a damaged checkpoint, another number of processes and a
    recipe that changes what the run computes (notes for cadence keys go to `log`). Then
    the main process, holding `lock`, puts the run back as it stood at that checkpoint:
    staging leftovers removed, metrics cut at its step, final/ and samples removed.
    """
    is_main = accelerator.is_main_process
    resume_from = find_checkpoint(run_dir, None if resume is True else Path(resume))
    if is_main:
        lock.acquire()
    if resume is True and has_completed(run_dir):
        raise RunDirError(
            f"--resume: {run_dir} has finished ({FINAL}/ is written); to train again from a checkpoint "
            f"name it (--resume {resume_from}), or start a new run with --overwrite"
        )
    if is_main:
        verify_checkpoint(resume_from)
    saved = json.loads((resume_from / TRAINER_STATE).read_text())
    check_processes(accelerator, saved)
    old = load_recipe(run_dir / RECIPE)
    for note in check_recipe_change(old, recipe, saved.get("data_sha256", {}), data_sha256):
        log(f"note: resuming with {note}")
    accelerator.wait_for_everyone()  # every process has read the run before the main one changes it
    if is_main:
        clean_staging(run_dir)
        truncate_metrics(run_dir / METRICS, int(saved["step"]))
        for name in END_ENTRIES:
            remove_entry(run_dir / name)
    return resume_from, saved


def data_hashes(data: DataSection) -> dict[str, str | None]:
    """{"data.train": sha256, "data.val": sha256 or None} of the files' bytes."""
    return {key: _file_sha256(getattr(data, key.split(".")[1])) for key in DATA_FILE_KEYS}


def _file_sha256(path: str | None) -> str | None:
    if path is None:
        return None
    return file_sha256(path)


def check_recipe_change(
    old: Recipe, new: Recipe, old_hashes: dict[str, str | None], new_hashes: dict[str, str | None]
) -> list[str]:
    """Compare the run's recipe with the one given to resume it, key by key.

    Returns notes for changed cadence keys and moved data files; raises RunDirError, in one
    line naming every changed key with its old and new value, when anything else changed.
    """
    before, after = _leaves(old.model_dump(mode="json")), _leaves(new.model_dump(mode="json"))
    changed, notes = [], []
    same_step = (
        before["train.batch_size"] * before["train.grad_accum"] == after["train.batch_size"] * after["train.grad_accum"]
    )
    if same_step and any(before[key] != after[key] for key in GEOMETRY_KEYS):
        notes.append(
            "train.batch_size × train.grad_accum "
            f"{before['train.batch_size']} × {before['train.grad_accum']} → "
            f"{after['train.batch_size']} × {after['train.grad_accum']}: the same examples per step, other "
            "micro-batches (the trajectory is unchanged up to floating-point summation order)"
        )
    for key in list(before) + [k for k in after if k not in before]:
        a, b = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if key in IGNORED_KEYS or (same_step and key in GEOMETRY_KEYS):
            continue
        if key in DATA_FILE_KEYS:
            if old_hashes.get(key) != new_hashes.get(key):
                changed.append(
                    f"{key} ({_show(a)} → {_show(b)}, different content)" if a != b else f"{key} (content changed)"
                )
            elif a != b:
                notes.append(f"{key} moved ({_show(a)} → {_show(b)}), same content")
            continue
        if a != b and key in CADENCE_KEYS:
            notes.append(f"{key} changed ({_show(a)} → {_show(b)}): cadence only, the trajectory is unchanged")
        elif a != b:
            changed.append(f"{key} ({_show(a)} → {_show(b)})")
    if changed:
        raise RunDirError(
            f"--resume: the recipe changes what this run computes: {', '.join(changed)}; "
            "put them back to resume, or start a new run with --output-dir DIR (or --overwrite)"
        )
    return notes


_ABSENT = object()


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 0.001, "method.target_modules": [...], ...}: mappings flattened, lists kept whole."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _show(value: Any) -> str:
    return "absent" if value is _ABSENT else json.dumps(value)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics lines of steps <= `step`, as an uninterrupted run had them then.

    The interrupted part may have logged steps after its last checkpoint; the resumed run
    logs them again. A torn last line (a kill mid-write) is dropped; a damaged line
    elsewhere is an error naming `path:line`. Rewritten via a temp file + rename.
    """
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    kept = []
    for i, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(numbered) - 1:
                break
            raise RunDirError(
                f"{path}:{number}: not valid JSON ({err.msg}); fix or delete this line, then resume"
            ) from None
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def restore(accelerator: Any, path: Path, model: Any, optimizer: Any) -> dict:
    """Load weights and optimizer state from checkpoint `path` into the prepared model and optimizer,
    in place, on every process; return its trainer_state.json.

    Replicated models (one process, ddp): `_restore_replicated`. Sharded (FSDP) and DeepSpeed
    models: the full tensors are read here and every process keeps its part
    (`ftkit.distributed.state`: `restore_sharded`, `restore_deepspeed`).
    RNG is not restored here: call `checkpoint.restore_rng` just before the loop, after
    everything that draws random numbers while the model is being built.
    """
    if is_deepspeed(accelerator):
        restore_deepspeed(accelerator, model, optimizer, load_tensors(path), load_optimizer_state(path), path)
    elif is_sharded(model):
        restore_sharded(model, optimizer, load_tensors(path), load_optimizer_state(path), path)
    else:
        _restore_replicated(path, accelerator.unwrap_model(model), optimizer)
    return json.loads((path / TRAINER_STATE).read_text())


def _restore_replicated(path: Path, model: Any, optimizer: Any) -> None:
    """Weights and optimizer state of a model every process holds whole."""
    load_weights(model, path)
    try:
        optimizer.load_state_dict(load_optimizer_state(path))
    except (ValueError, KeyError) as err:
        raise RunDirError(f"{path}: the optimizer state does not fit this optimizer ({err})") from None
    _repage(optimizer)


def state_from(saved: dict) -> TrainState:
    """The TrainState stored in a checkpoint's trainer_state.json."""
    if "batch_in_epoch" in saved and "step_in_epoch" not in saved:
        raise RunDirError(
            "--resume: this checkpoint was written by an ftkit whose data order counted micro-batches "
            "(batch_in_epoch); it cannot be continued exactly: start a new run with --overwrite"
        )
    names = {f.name for f in fields(TrainState)}
    return TrainState(**{key: value for key, value in saved.items() if key in names})


def restore_generators(accelerator: Any, path: Path, saved: dict) -> None:
    """Every random generator as it was at checkpoint `path`: python, numpy, torch CPU and CUDA
    (`saved` is its trainer_state.json), then each process's own torch generators.

    Call it last, just before the loop: building the model and the optimizer draws from them.
    """
    restore_rng(load_file(path / RNG), saved["rng"])
    restore_rank_rng(accelerator, saved)  # each process's own torch generators


def _repage(optimizer: Any) -> None:
    """Put a paged bitsandbytes optimizer's big states back into paged (CUDA unified) memory.

    `load_state_dict` restores the values exactly but as ordinary device tensors, so a
    resumed run would hold the whole optimizer state in GPU memory where the original
    paged it out. Same rule as bitsandbytes' `get_state_buffer`: CUDA, >= 1e5 elements.
    On CPU bitsandbytes never pages, and this does nothing.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    if not getattr(inner, "is_paged", False):
        return
    for group in inner.param_groups:
        for param in group["params"]:
            state = inner.state.get(param, {})
            for key in ("state1", "state2"):
                value = state.get(key)
                if (
                    isinstance(value, torch.Tensor)
                    and value.is_cuda
                    and not getattr(value, "is_paged", False)
                    and param.numel() >= 1e5
                ):
                    buffer = inner.get_state_buffer(param, dtype=value.dtype)
                    buffer.copy_(value)
                    state[key] = buffer
