"""Checkpoints: atomic, self-describing, pickle-free.

Layout of `checkpoints/step-N/`:
    adapter or model files   exactly what `final/` holds (save_pretrained, safetensors)
    optimizer.safetensors    every tensor of the optimizer state, keyed by its path
    optimizer.json           the rest of the optimizer state (param groups, scalars)
    rng.safetensors          torch CPU / CUDA generator states
    trainer_state.json       counters, data position, python/numpy RNG, eval history
    complete.json            written last: step and each file's size and sha256

A checkpoint is staged as `.step-N.tmp-<pid>`, fsynced, and renamed into place by
one process, so a crash mid-save leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")
STAGING_DIR = re.compile(r"^\.step-(\d+)\.tmp-(\d+)$")


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested optimizer state into {path: tensor} and a JSON skeleton with tensor refs."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous()
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def save_checkpoint(run_dir: Path, model: Any, tokenizer: Any, optimizer: Any, trainer_state: dict) -> Path:
    """Write `checkpoints/step-N/` atomically and return its path."""
    step = int(trainer_state["step"])
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".step-{step}.tmp-{os.getpid()}"
    final = root / f"step-{step}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        save_weights(model, tokenizer, staging)
        opt_tensors, opt_skeleton = flatten_state(optimizer.state_dict())
        save_file(opt_tensors, staging / "optimizer.safetensors")
        write_json(staging / "optimizer.json", opt_skeleton)
        rng_tensors, rng_meta = capture_rng()
        save_file(rng_tensors, staging / "rng.safetensors")
        write_json(staging / "trainer_state.json", {**trainer_state, "rng": rng_meta})
        files = {
            str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        write_json(staging / "complete.json", {"step": step, "files": files})
        _fsync_tree(staging)
        if final.exists():  # a re-run of the same step (resume): replace only our own checkpoint
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def save_weights(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """What `final/` holds: a PEFT adapter or the whole model (safetensors) + tokenizer."""
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def is_complete(path: Path) -> bool:
    return STEP_DIR.match(path.name) is not None and (path / "complete.json").is_file() and not path.is_symlink()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """ftkit's complete checkpoints in the run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def rotate(run_dir: Path, keep_last: int, best_step: int | None) -> list[Path]:
    """Delete all but the `keep_last` newest complete checkpoints and the best one.

    Only ftkit's own `step-N` directories with a complete.json inside `checkpoints/`
    are ever deleted; anything else there is left alone.
    """
    checkpoints = complete_checkpoints(run_dir)
    keep = set(checkpoints[-keep_last:])
    if best_step is not None:
        keep |= {p for p in checkpoints if p.name == f"step-{best_step}"}
    removed = []
    root = (run_dir / "checkpoints").resolve()
    for path in checkpoints:
        if path not in keep and path.resolve().parent == root:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def load_optimizer_state(path: Path) -> dict:
    skeleton = json.loads((path / "optimizer.json").read_text())
    return unflatten_state(skeleton, load_file(path / "optimizer.safetensors"))
