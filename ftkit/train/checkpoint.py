"""Checkpoints: atomic, self-describing, pickle-free.

Layout of `checkpoints/step-N/`:
    adapter or model files   exactly what `final/` holds (save_pretrained, safetensors)
    optimizer.safetensors    every tensor of the optimizer state, keyed by its path
    optimizer.json           the rest of the optimizer state (param groups, scalars)
    rng.safetensors          torch CPU / CUDA generator states
    method_state.safetensors what a method keeps besides its weights (MethodHooks.state), if any
    trainer_state.json       counters, data position, python/numpy RNG, eval history
    complete.json            written last: step and each file's size and sha256

A checkpoint is staged as `.step-N.tmp-<pid>`, fsynced, and renamed into place by
one process, so a crash mid-save leaves the previous checkpoint as the newest complete one.
Nothing complete is ever modified in place: a checkpoint that is replaced or rotated out
is first renamed to `.step-N.old-<pid>` and only then deleted. Staging and `.old` leftovers
of a killed process are never loaded and are removed by `clean_staging` on the next start.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ftkit.errors import ResourceError, RunDirError
from ftkit.io import file_sha256
from ftkit.models.hf_files import has_adapter_config, load_tensors
from ftkit.rundir import (
    CHECKPOINTS,
    COMPLETE,
    TRAINER_STATE,
    checkpoints_dir,
    complete_checkpoints,
)
from ftkit.train.faults import fault_point

STAGING_DIR = re.compile(r"^\.step-(\d+)\.(?:tmp|old)-(\d+)$")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# inside checkpoints/step-N/, besides what final/ holds and rundir's COMPLETE and TRAINER_STATE
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_SKELETON = "optimizer.json"
RNG = "rng.safetensors"
METHOD_STATE = "method_state.safetensors"


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested optimizer state into {path: tensor} and a JSON skeleton with tensor refs.

    A tensor met again (the same view of the same storage) is stored once and referenced from
    every place it appeared, so loading restores the sharing. bitsandbytes' 8-bit optimizers
    need this: one quantile map (`qmap1`, `qmap2`) is shared by every parameter's state, and
    safetensors refuses to write tensors that share memory. A partly overlapping view is copied.
    """
    tensors: dict[str, torch.Tensor] = {}
    views: dict[tuple, str] = {}  # (storage, offset, shape, stride, dtype, device) -> path stored
    storages: set[tuple] = set()

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            storage = (node.untyped_storage().data_ptr(), node.device)
            view = (*storage, node.storage_offset(), tuple(node.shape), node.stride(), node.dtype)
            if view in views:
                return {"__tensor__": views[view]}
            tensor = node.detach().cpu().contiguous()
            tensors[path] = tensor.clone() if storage in storages and tensor.data_ptr() == node.data_ptr() else tensor
            views[view] = path
            storages.add(storage)
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {
                "__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{k}")] for i, (k, v) in enumerate(node.items())]
            }
        if isinstance(node, (list, tuple)):
            return {"__list__": [walk(v, f"{path}.{i}") for i, v in enumerate(node)], "tuple": isinstance(node, tuple)}
        return node

    return tensors, walk(obj, prefix or "state")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            items = [unflatten_state(v, tensors) for v in skeleton["__list__"]]
            return tuple(items) if skeleton.get("tuple") else items
    return skeleton


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n")


def save_checkpoint(
    run_dir: Path,
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    trainer_state: dict,
    expected_bytes: int = 0,
    method_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `checkpoints/step-N/` atomically and return its path.

    On a full disk (ENOSPC/EDQUOT) the staging directory is dropped and ResourceError
    names the path and the bytes a checkpoint needs (the newest complete checkpoint's
    size, else `expected_bytes`); every complete checkpoint is left as it was.
    """
    step = int(trainer_state["step"])
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".step-{step}.tmp-{os.getpid()}"
    final = root / f"step-{step}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        staging.mkdir()
        save_weights(model, tokenizer, staging)
        fault_point("save-weights", step)
        opt_tensors, opt_skeleton = flatten_state(optimizer.state_dict())
        save_file(opt_tensors, staging / OPTIMIZER_TENSORS)
        write_json(staging / OPTIMIZER_SKELETON, opt_skeleton)
        fault_point("save-optimizer", step)
        if method_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in method_state.items()}, staging / METHOD_STATE)
        rng_tensors, rng_meta = capture_rng()
        save_file(rng_tensors, staging / RNG)
        write_json(staging / TRAINER_STATE, {**trainer_state, "rng": rng_meta})
        files = {
            str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        write_json(staging / COMPLETE, {"step": step, "files": files})
        fault_point("save-complete", step)
        _fsync_tree(staging)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        if err.errno in DISK_FULL:
            raise disk_full_error(run_dir, f"{staging} (checkpoint step {step})", expected_bytes) from err
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # A re-save of a step (resume from an older checkpoint) moves the old one aside first,
    # so there is never a moment without a complete step-N that a kill could catch.
    retired = _retire(final) if final.exists() else None
    os.rename(staging, final)
    _fsync_dir(root)
    fault_point("save-renamed", step)
    if retired is not None:
        shutil.rmtree(retired)
    return final


def disk_full_error(run_dir: Path, what: str, expected_bytes: int = 0) -> ResourceError:
    """One line: what could not be written, the bytes needed and free, and that the last checkpoint stands."""
    newest = complete_checkpoints(run_dir)
    needed = checkpoint_bytes(newest[-1]) if newest else expected_bytes
    kept = f"the last complete checkpoint {newest[-1]} is intact" if newest else "no checkpoint was completed"
    return ResourceError(
        f"{what}: disk full; a checkpoint needs about {_gib(needed)} ({needed:,} bytes), "
        f"{_gib(free_bytes(run_dir))} free; {kept}. Free some space (or lower train.keep_last), "
        "then continue with: ftkit train RECIPE --resume"
    )


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def checkpoint_bytes(path: Path) -> int:
    """Total size of a complete checkpoint, from its complete.json."""
    files = json.loads((path / COMPLETE).read_text())["files"]
    return sum(int(entry["bytes"]) for entry in files.values())


def estimate_checkpoint_bytes(model: Any, optimizer_name: str) -> int:
    """Bytes one checkpoint will take, before any was written.

    weights: the trainable tensors for an adapter (what save_pretrained writes for a
    PeftModel), every tensor for a full model; optimizer state per trainable element:
    two moments in the parameter's dtype for adamw / paged_adamw_32bit (2 x 4 bytes in
    fp32), two uint8 moments for the 8-bit optimizers (their 32-bit fallback for tensors
    under 4096 elements and the quantile maps are small enough to ignore here).
    """
    # a method that saves its trained tensors only (bottleneck adapters) is sized like an adapter
    is_adapter = hasattr(model, "peft_config") or getattr(model, "saves_trained_weights_only", False)
    weights = optimizer = 0
    for param in model.parameters():
        size = param.numel() * param.element_size()
        if param.requires_grad:
            weights += size
            optimizer += 2 * param.numel() * (1 if "8bit" in optimizer_name else param.element_size())
        elif not is_adapter:
            weights += size
    return weights + optimizer


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _retire(path: Path) -> Path:
    """Rename a complete checkpoint out of the `step-N` namespace before deleting it."""
    retired = path.with_name(f".{path.name}.old-{os.getpid()}")
    if retired.exists():
        shutil.rmtree(retired)
    os.rename(path, retired)
    return retired


def save_weights(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """What `final/` holds: a PEFT adapter or the whole model (safetensors) + tokenizer."""
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def clean_staging(run_dir: Path) -> list[Path]:
    """Remove what a killed save or rotation left behind: `.step-N.tmp-PID` and `.step-N.old-PID` dirs.

    Call it only while holding the run (one trainer per run dir), so none of them is live.
    """
    root = run_dir / CHECKPOINTS
    if not root.is_dir() or root.is_symlink():
        return []
    stale = [p for p in root.iterdir() if STAGING_DIR.match(p.name) and p.is_dir() and not p.is_symlink()]
    for path in stale:
        shutil.rmtree(path)
    return stale


def rotate(run_dir: Path, keep_last: int, best_step: int | None) -> list[Path]:
    """Delete all but the `keep_last` newest complete checkpoints and the best one.

    Only ftkit's own `step-N` directories with a complete.json, directly inside
    `checkpoints/` and not symlinks, are ever deleted; anything else there is left alone.
    Each is renamed out of the `step-N` namespace before it is deleted, so a kill
    mid-delete never leaves a half-deleted directory that looks complete.
    """
    checkpoints = complete_checkpoints(run_dir)
    keep = set(checkpoints[-keep_last:])
    if best_step is not None:
        keep |= {p for p in checkpoints if p.name == f"step-{best_step}"}
    removed = []
    root = (run_dir / CHECKPOINTS).resolve()
    for path in checkpoints:
        if path not in keep and path.resolve().parent == root:
            shutil.rmtree(_retire(path))
            removed.append(path)
    return removed


def verify_checkpoint(path: Path) -> dict:
    """Check every file complete.json lists (inside the checkpoint, size, sha256); return complete.json.

    RunDirError names the first file that does not match: a damaged checkpoint is never loaded.
    """
    try:
        complete = json.loads((path / COMPLETE).read_text())
        files = complete["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunDirError(f"{path}/complete.json: unreadable ({err}); resume from another checkpoint") from None
    for name, entry in files.items():
        file = path / name
        if not file.resolve().is_relative_to(path.resolve()):
            raise RunDirError(f"{path}/complete.json: lists {name!r}, outside the checkpoint; refusing to load it")
        if not file.is_file() or file.stat().st_size != entry["bytes"] or file_sha256(file) != entry["sha256"]:
            raise RunDirError(
                f"{file}: damaged (size or sha256 differs from complete.json); "
                "resume from an older checkpoint with --resume PATH, or start again with --overwrite"
            )
    return complete


def load_weights(model: Any, path: Path) -> None:
    """Load the trainable weights saved by `save_weights` at `path` into `model`, in place.

    An adapter goes through peft's `set_peft_model_state_dict` (adapter names, modules_to_save);
    a full model through `load_state_dict` by parameter name. Every trainable parameter must be
    in the files, or share storage with one that is (tied embeddings); otherwise RunDirError.
    A model with its own `load_trained_weights(path)` (a method's wrapper: Medusa) reads its files itself.
    """
    own_loader = getattr(model, "load_trained_weights", None)  # a method's own model (Medusa) reads its files
    if callable(own_loader):
        own_loader(path)
        return
    state = load_tensors(path)
    if has_adapter_config(path):
        result = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise RunDirError(
                f"{path}: adapter tensors the model does not have: {', '.join(result.unexpected_keys[:3])}"
            )
        loaded = {name for name, _ in model.named_parameters()} - set(result.missing_keys)
    else:
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise RunDirError(f"{path}: tensors the model does not have: {', '.join(result.unexpected_keys[:3])}")
        loaded = set(state)
    params = dict(model.named_parameters())
    loaded_storage = {params[name].data_ptr() for name in loaded if name in params}
    missing = [
        n for n, p in params.items() if p.requires_grad and n not in loaded and p.data_ptr() not in loaded_storage
    ]
    if missing:
        raise RunDirError(f"{path}: no saved weights for trainable {', '.join(missing[:3])}; is this the same method?")


def load_method_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors a method saved in checkpoint `path` (MethodHooks.state); RunDirError when absent."""
    file = path / METHOD_STATE
    if not file.is_file():
        raise RunDirError(f"{path}: no {METHOD_STATE}, which this method needs to resume; is this the same method?")
    return load_file(file)


def load_optimizer_state(path: Path) -> dict:
    skeleton = json.loads((path / "optimizer.json").read_text())
    return unflatten_state(skeleton, load_file(path / "optimizer.safetensors"))
