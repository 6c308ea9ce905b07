"""Checkpoint files, rotation, the resume guard and the signal handler, without training."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftkit.errors import RunDirError
from ftkit.io import file_sha256
from ftkit.recipe import parse_recipe
from ftkit.recipe.schema import TrainSection
from ftkit.train import checkpoint as ckpt
from ftkit.train import faults
from ftkit.train.optim import build_optimizer
from ftkit.train.resume import check_recipe_change, truncate_metrics
from ftkit.train.signals import StopSignals
from tests.support.faults import injector, parse


def fake_checkpoint(root: Path, name: str, files: dict[str, bytes] | None = None) -> Path:
    """A checkpoint directory with `files` and a matching complete.json."""
    path = root / name
    path.mkdir(parents=True)
    for file, data in (files or {"weights.safetensors": name.encode()}).items():
        (path / file).write_bytes(data)
    listed = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in path.iterdir()}
    (path / "complete.json").write_text(json.dumps({"step": int(name.split("-")[1].split(".")[0]), "files": listed}))
    return path


def test_rotation_keeps_the_newest_and_the_best_and_nothing_else_is_touched(tmp_path):
    """R14: keep_last 2 + best; an unmarked step dir, a link to outside and user files survive."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    for step in range(1, 6):
        fake_checkpoint(root, f"step-{step}")
    (root / "step-6").mkdir()  # unmarked: no complete.json (not known to be ftkit's)
    outside = fake_checkpoint(tmp_path / "outside", "step-7")
    (root / "step-7").symlink_to(outside)
    (root / "notes.txt").write_text("mine")

    removed = ckpt.rotate(run, keep_last=2, best_step=1)
    assert sorted(p.name for p in removed) == ["step-2", "step-3"]
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step-1", "step-4", "step-5", "step-6", "step-7"]
    assert (outside / "complete.json").is_file() and (root / "notes.txt").read_text() == "mine"


def test_staging_leftovers_are_never_loaded_and_are_cleaned(tmp_path):
    """R12: a killed save's `.step-N.tmp-PID` (even with a complete.json inside) is not a checkpoint."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    fake_checkpoint(root, "step-2")
    fake_checkpoint(root, ".step-4.tmp-999")
    fake_checkpoint(root, ".step-2.old-998")
    (root / ".mine").mkdir()
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-2"]
    assert sorted(p.name for p in ckpt.clean_staging(run)) == [".step-2.old-998", ".step-4.tmp-999"]
    assert sorted(p.name for p in root.iterdir()) == [".mine", "step-2"]


def test_verify_names_the_damaged_file_and_refuses_paths_outside(tmp_path):
    path = fake_checkpoint(tmp_path, "step-3", {"a.safetensors": b"12345", "b.json": b"{}"})
    ckpt.verify_checkpoint(path)
    (path / "a.safetensors").write_bytes(b"12346")  # same size, other bytes
    with pytest.raises(RunDirError, match=r"a\.safetensors: damaged"):
        ckpt.verify_checkpoint(path)
    (path / "complete.json").write_text(json.dumps({"step": 3, "files": {"../x": {"bytes": 0, "sha256": ""}}}))
    with pytest.raises(RunDirError, match="outside the checkpoint"):
        ckpt.verify_checkpoint(path)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_optimizer_state_round_trips_bit_exactly(tmp_path, optimizer):
    """Through safetensors + JSON and back, an optimizer continues exactly as the original.

    8192 elements is above bitsandbytes' min_8bit_size (4096), so the 8-bit optimizers keep
    uint8 moments with per-block absmax and quantile maps: all must survive unchanged. Two
    such parameters share one quantile map, which safetensors cannot write twice."""
    torch.manual_seed(0)
    cfg = TrainSection(lr=1e-2, optimizer=optimizer)
    a = [torch.nn.Parameter(torch.randn(128, 64)), torch.nn.Parameter(torch.randn(64, 128))]
    opt_a = build_optimizer(a, cfg)
    grads = [[torch.randn_like(p) for p in a] for _ in range(5)]
    for grad in grads[:3]:
        for p, g in zip(a, grad, strict=True):
            p.grad = g.clone()
        opt_a.step()
    tensors, skeleton = ckpt.flatten_state(opt_a.state_dict())
    save_file(tensors, tmp_path / "optimizer.safetensors")
    ckpt.write_json(tmp_path / "optimizer.json", skeleton)
    if "8bit" in optimizer:
        assert sum(t.dtype == torch.uint8 and t.numel() == 8192 for t in tensors.values()) == 4  # 2 moments x 2

    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = build_optimizer(b, cfg)
    opt_b.load_state_dict(ckpt.load_optimizer_state(tmp_path))
    for grad in grads[3:]:
        for p, q, g in zip(a, b, grad, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    after_a, _ = ckpt.flatten_state(opt_a.state_dict())
    after_b, _ = ckpt.flatten_state(opt_b.state_dict())
    assert after_a.keys() == after_b.keys() and all(torch.equal(after_a[k], after_b[k]) for k in after_a)


def test_flatten_stores_a_shared_tensor_once_and_shares_it_again(tmp_path):
    shared, base = torch.arange(4.0), torch.arange(6.0)
    state = {"a": shared, "b": shared, "c": base[:3], "d": base[3:]}
    tensors, skeleton = ckpt.flatten_state(state)
    assert sorted(tensors) == ["state.a", "state.c", "state.d"]
    save_file(tensors, tmp_path / "s.safetensors")  # refuses tensors that share memory
    back = ckpt.unflatten_state(skeleton, load_file(tmp_path / "s.safetensors"))
    assert back["a"] is back["b"] and torch.equal(back["d"], torch.tensor([3.0, 4.0, 5.0]))


def test_flatten_keeps_int_keys_tuples_and_scalars():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}},
        "param_groups": [{"betas": (0.9, 0.99), "x": None, "params": [0]}],
    }
    tensors, skeleton = ckpt.flatten_state(state)
    back = ckpt.unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert list(back["state"]) == [0] and back["param_groups"][0]["betas"] == (0.9, 0.99)
    assert back["param_groups"][0]["x"] is None and torch.equal(back["state"][0]["m"], torch.ones(2))


def test_estimate_counts_adapter_weights_and_optimizer_moments():
    model = torch.nn.Linear(10, 10)  # 110 float32 parameters, all trainable: a full model
    assert ckpt.estimate_checkpoint_bytes(model, "adamw") == 110 * 4 + 2 * 110 * 4
    assert ckpt.estimate_checkpoint_bytes(model, "paged_adamw_8bit") == 110 * 4 + 2 * 110


def test_fault_specs_parse_and_bad_ones_are_refused():
    assert parse("kill@step:3, stall@save-weights:4") == [("kill", "step", 3), ("stall", "save-weights", 4)]
    for bad in ("explode@step:3", "kill@somewhere:3", "kill@step:x", "kill"):
        with pytest.raises(ValueError, match="FTKIT_TEST_FAULT"):
            parse(bad)


def test_fault_points_do_nothing_until_an_injector_is_installed(monkeypatch):
    monkeypatch.setenv("FTKIT_TEST_FAULT", "crash@step:3")  # product code never reads it
    faults.fault_point("step", 3)
    with faults.installed(injector("crash@step:3")):
        faults.fault_point("step", 2)
        faults.fault_point("save-weights", 3)
        with pytest.raises(RuntimeError, match="injected fault at step:3"):
            faults.fault_point("step", 3)
    faults.fault_point("step", 3)  # uninstalled on the way out


def recipe(tmp_path: Path, extra: str = "", train_file: str = "train.jsonl") -> object:
    return parse_recipe(
        f"method: {{name: lora, r: 8}}\ndata: {{train: {tmp_path / train_file}}}\ntrain: {{seed: 1{extra}}}\n"
    )


def test_resume_guard_names_each_trajectory_change_and_notes_cadence(tmp_path):
    """R15 at the function level: one line naming every changed key, old → new."""
    old = recipe(tmp_path)
    hashes = {"data.train": "aa", "data.val": None}
    new = parse_recipe(
        f"method: {{name: lora, r: 4}}\ndata: {{train: {tmp_path / 'train.jsonl'}}}\n"
        "train: {seed: 1, batch_size: 4, eval_every: 5}\n"
    )
    with pytest.raises(RunDirError) as info:
        check_recipe_change(old, new, hashes, hashes)
    message = str(info.value)
    assert "\n" not in message
    assert "method.r (8 → 4)" in message and "train.batch_size (8 → 4)" in message and "eval_every" not in message

    cadence = recipe(tmp_path, ", eval_every: 5, save_every: 10")
    notes = check_recipe_change(old, cadence, hashes, hashes)
    assert notes == [
        "train.eval_every changed (null → 5): cadence only, the trajectory is unchanged",
        "train.save_every changed (null → 10): cadence only, the trajectory is unchanged",
    ]
    moved = recipe(tmp_path, train_file="moved.jsonl")
    assert check_recipe_change(old, moved, hashes, hashes)[0].startswith("data.train moved")
    with pytest.raises(RunDirError, match=r"data\.train \(content changed\)"):
        check_recipe_change(old, old, hashes, {"data.train": "bb", "data.val": None})
    switched = parse_recipe(
        f"method: {{name: full}}\ndata: {{train: {tmp_path / 'train.jsonl'}}}\ntrain: {{seed: 1}}\n"
    )
    with pytest.raises(RunDirError, match=r"method\.name \(\"lora\" → \"full\"\).*method\.r \(8 → absent\)"):
        check_recipe_change(old, switched, hashes, hashes)


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 7)]
    lines.insert(3, json.dumps({"step": 3, "val_loss": 0.5}))
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + '\n{"step": 7, "lo')  # torn by a kill
    truncate_metrics(path, 4)
    assert path.read_text() == "\n".join(lines[:5]) + "\n"
    path.write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")
    with pytest.raises(RunDirError, match=r"metrics\.jsonl:2: not valid JSON"):
        truncate_metrics(path, 4)


def test_stop_signals_record_the_first_signal_and_restore_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_saved_rng_state_replays_the_same_draws(tmp_path):
    import random

    import numpy as np

    tensors, meta = ckpt.capture_rng()
    save_file(tensors, tmp_path / "rng.safetensors")
    first = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.restore_rng(load_file(tmp_path / "rng.safetensors"), json.loads(json.dumps(meta)))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_sources_never_unpickle_or_run_code_from_files():
    """Issue part 8: no pickle, no `torch.load` without weights_only=True, no unsafe YAML, no eval/exec."""
    import re

    root = Path(__file__).resolve().parents[2] / "ftkit"
    unsafe = re.compile(
        r"\bimport pickle\b|\bpickle\.|\bdill\b|torch\.load\((?![^)]*weights_only=True)|yaml\.(?:unsafe_)?load\("
        r"|yaml\.(?:Full|Unsafe)?Loader\b|(?<![.\w])(?:eval|exec)\("
    )
    found = [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for path in sorted(root.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if unsafe.search(line)
    ]
    assert not found, found
