"""What a run does when something goes wrong (RELIABILITY.md R13, R16, R17, R19, R20, R25, R26).

Faults are injected by wrapping ftkit's own functions (the objective's loss, the checkpoint
writer's JSON writer, the free-space probe); every run is the CLI as a user runs it.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftkit.errors import ResourceError
from ftkit.tasks.causal_lm import SFT
from ftkit.train import checkpoint as checkpoint_module
from ftkit.train.checkpoint import verify_checkpoint
from ftkit.train.lock import RunLock
from tests.support.helpers import make_recipe, run_cli
from tests.support.resume_helpers import ROOT, sections, train, trajectory, tree_digest

RECIPE = sections(train={"max_steps": 8, "eval_every": None})


def fail_at_step(monkeypatch, step: int, make_failure) -> None:
    """Make the objective's loss of training step `step` (1-based, grad_accum 1) fail as `make_failure` says."""
    calls = {"n": 0}
    loss_sum = SFT.loss_sum

    def failing(self, model, batch):
        loss, metrics = loss_sum(self, model, batch)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == step:
                return make_failure(loss), metrics
        return loss, metrics

    monkeypatch.setattr(SFT, "loss_sum", failing)


def raise_(error: BaseException):
    def fail(loss):
        raise error

    return fail


def error_lines(err: str) -> list[str]:
    """The failure lines of a CLI's stderr; progress and log lines come before them."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith(("error:", "interrupted:"))]


def steps_saved(run_dir: Path) -> list[int]:
    found = (run_dir / "checkpoints").glob("step-*")
    return sorted(int(p.name[5:]) for p in found if (p / "complete.json").is_file())


def test_nonfinite_loss_stops_with_exit_3_and_saves_nothing_after_it(tmp_path, tiny_data, monkeypatch):
    """R17, policy stop: inf at step 5 → no update, exit 3, the report names step 5, step-4 is the last save."""
    fail_at_step(monkeypatch, 5, lambda loss: loss + float("inf"))
    code, err, run_dir = train(tmp_path, tiny_data, "nan", **RECIPE)
    assert code == 3
    (line,) = error_lines(err)
    assert line.startswith("error: non-finite loss at step 5; no update applied")
    assert steps_saved(run_dir) == [2, 4]
    assert not (run_dir / "final").exists()
    assert max(r["step"] for r in trajectory(run_dir)) == 4
    assert "non-finite loss at step 5" in (run_dir / "report.md").read_text()
    verify_checkpoint(run_dir / "checkpoints" / "step-4")


def test_skip_policy_leaves_the_step_bit_identical(tmp_path, tiny_data, monkeypatch):
    """R17, policy skip: the weights and optimizer state after the skipped step equal those before it."""
    fail_at_step(monkeypatch, 3, lambda loss: loss * float("nan"))
    train_cfg = {**RECIPE["train"], "on_nonfinite": "skip", "save_every": 1}
    code, err, run_dir = train(tmp_path, tiny_data, "skip", method=RECIPE["method"], train=train_cfg)
    assert code == 0, err
    ckpt = run_dir / "checkpoints"
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        before, after = load_file(ckpt / "step-2" / name), load_file(ckpt / "step-3" / name)
        assert all(torch.equal(before[k], after[k]) for k in before), name
    at_3, at_4 = (load_file(ckpt / f"step-{n}" / "adapter_model.safetensors") for n in (3, 4))
    assert any(not torch.equal(at_4[k], at_3[k]) for k in at_4), "step 4 should train again"
    (skipped,) = [r for r in trajectory(run_dir) if "skipped" in r]
    assert (skipped["step"], skipped["skipped"]) == (3, "non-finite loss") and "loss" not in skipped
    assert json.loads((run_dir / "summary.json").read_text())["facts"]["skipped_steps"] == 1

    fail_at_step(monkeypatch, 2, lambda loss: loss * float("nan"))
    train_cfg = {**train_cfg, "max_skips": 0}
    code, err, _ = train(tmp_path, tiny_data, "skip0", method=RECIPE["method"], train=train_cfg)
    assert code == 3 and "more than train.max_skips=0 skipped" in err


def test_out_of_memory_is_one_line_with_the_fixes(tmp_path, tiny_data, monkeypatch):
    """R19: no traceback without --debug; the line names the geometry and the keys that make it fit."""
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    fail_at_step(monkeypatch, 2, raise_(oom))
    code, err, run_dir = train(tmp_path, tiny_data, "oom", **RECIPE)
    assert code == 1
    (line,) = error_lines(err)
    assert line.startswith("error: out of memory at step 2: micro-batch of train.batch_size=8 examples × up to ")
    for fix in ("train.batch_size=4 with train.grad_accum=2", "model.gradient_checkpointing: true", "qlora"):
        assert fix in line
    assert "peak" in line
    assert "out of memory at step 2" in (run_dir / "report.md").read_text()

    fail_at_step(monkeypatch, 1, raise_(oom))
    recipe = make_recipe(tmp_path, tiny_data, name="oom-debug", **RECIPE)
    with pytest.raises(ResourceError):  # --debug lets the exception (and its traceback) through
        run_cli("--debug", "train", str(recipe))


def test_disk_full_mid_save_keeps_the_last_checkpoint(tmp_path, tiny_data, monkeypatch):
    """R13: ENOSPC while checkpoint 4 is written: exit 1 naming the path and the bytes; step-2 intact; resumable."""
    write_json = checkpoint_module.write_json

    def full_disk(path: Path, obj) -> None:
        if ".step-4." in str(path) and path.name == "trainer_state.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_json(path, obj)

    monkeypatch.setattr(checkpoint_module, "write_json", full_disk)
    code, err, run_dir = train(tmp_path, tiny_data, "full", **RECIPE)
    assert code == 1
    (line,) = error_lines(err)
    size = sum(
        e["bytes"] for e in json.loads((run_dir / "checkpoints/step-2/complete.json").read_text())["files"].values()
    )
    assert f"{run_dir / 'checkpoints'}/.step-4.tmp-" in line and "disk full" in line
    assert f"({size:,} bytes)" in line and "step-2 is intact" in line
    assert steps_saved(run_dir) == [2] and not list((run_dir / "checkpoints").glob(".step-*"))
    verify_checkpoint(run_dir / "checkpoints" / "step-2")

    monkeypatch.setattr(checkpoint_module, "write_json", write_json)
    code, err, _ = train(tmp_path, tiny_data, "full", "--resume")
    assert code == 0, err


def test_preflight_refuses_a_disk_too_small_and_leaves_no_run_dir(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "free_bytes", lambda path: 1000)
    code, err, run_dir = train(tmp_path, tiny_data, "small", **RECIPE)
    assert code == 1
    (line,) = error_lines(err)
    assert "not enough disk space" in line and "train.keep_last=10" in line and "1,000 free" in line
    assert not run_dir.exists()


def test_non_empty_output_dir_is_refused_and_left_untouched(tmp_path, tiny_data):
    """R20, and --overwrite replaces only what ftkit made, saying what it kept."""
    run_dir = tmp_path / "runs" / "busy"
    (run_dir / "base").mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    before = tree_digest(run_dir)
    code, err, _ = train(tmp_path, tiny_data, "busy", **RECIPE)
    assert code == 2 and "is not empty" in err and "--overwrite" in err
    code, err, _ = train(tmp_path, tiny_data, "busy", "--overwrite")
    assert code == 2 and "not an ftkit run directory" in err
    assert tree_digest(run_dir) == before

    (run_dir / "base").rmdir()
    code, err, _ = train(tmp_path, tiny_data, "busy", "--set", "train.max_steps=2", "--overwrite")
    assert code == 0, err
    assert "keeps files ftkit did not make" in err and "notes.txt" in err
    assert (run_dir / "notes.txt").read_text() == "mine"

    with RunLock(run_dir) as lock:  # a second trainer in the same run directory is refused
        lock.acquire()
        before = tree_digest(run_dir)
        code, err, _ = train(tmp_path, tiny_data, "busy", "--overwrite")
        assert code == 2 and "another ftkit process is training" in err
        assert tree_digest(run_dir) == before


def test_checkpoints_linked_outside_the_run_are_refused(tmp_path, tiny_data):
    code, _, run_dir = train(tmp_path, tiny_data, "link", fault="sigterm@step:2", **RECIPE)
    assert code == 143
    outside = tmp_path / "elsewhere"
    (run_dir / "checkpoints").rename(outside)
    (run_dir / "checkpoints").symlink_to(outside)
    code, err, _ = train(tmp_path, tiny_data, "link", "--resume")
    assert code == 2 and "outside the run directory" in err


def test_run_dir_holds_no_pickle_and_no_token(tmp_path, tiny_data, monkeypatch):
    """R16 and the token rule: only safetensors / JSON / YAML / text files; HF_TOKEN never written out."""
    token = "hf_SENTINELtoken0123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    code, err, run_dir = train(tmp_path, tiny_data, "safe", fault="sigterm@step:3", **RECIPE)
    assert code == 143
    code, err, _ = train(tmp_path, tiny_data, "safe", "--resume")
    assert code == 0 and token not in err
    # .jinja is the chat template transformers writes next to the tokenizer, .log logs/libraries.log (plain text)
    allowed = {".safetensors", ".json", ".jsonl", ".yaml", ".md", ".png", ".jinja", ".log"}
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= allowed
    for path in files:
        head = path.read_bytes()
        assert not head.startswith((b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")), path
        assert token.encode() not in head, path


def test_remote_code_needs_the_recipe_flag(tmp_path, tiny_data):
    """R26: a model directory that ships code (auto_map) is refused naming the key; with
    model.trust_remote_code it loads the code and says so loudly. The child process keeps
    transformers' module cache inside tmp_path."""
    from ftkit.models.builtin import materialize_builtin

    model_dir = materialize_builtin("builtin:micro-llama", tmp_path / "remote-model", seed=0)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_micro.MicroConfig",
        "AutoModelForCausalLM": "modeling_micro.MicroForCausalLM",
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    sentinel = tmp_path / "remote-code-ran"
    (model_dir / "configuration_micro.py").write_text(
        "import os\nfrom pathlib import Path\nfrom transformers import LlamaConfig\n\n"
        "Path(os.environ['FTKIT_TEST_SENTINEL']).write_text('ran')\n\n\n"
        "class MicroConfig(LlamaConfig):\n    pass\n"
    )
    (model_dir / "modeling_micro.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_micro import MicroConfig\n\n\n"
        "class MicroForCausalLM(LlamaForCausalLM):\n    config_class = MicroConfig\n"
    )
    train_cfg = {**RECIPE["train"], "max_steps": 1, "save_every": None}
    model = {"name": str(model_dir)}
    code, err, run_dir = train(tmp_path, tiny_data, "remote", model=model, method=RECIPE["method"], train=train_cfg)
    assert code == 2
    assert "model.trust_remote_code" in err and "auto_map" in err
    assert not run_dir.exists() and not sentinel.exists()

    recipe = make_recipe(
        tmp_path,
        tiny_data,
        name="trusted",
        model={**model, "trust_remote_code": True},
        method=RECIPE["method"],
        train=train_cfg,
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "FTKIT_TEST_SENTINEL": str(sentinel),
    }
    done = subprocess.run(
        [sys.executable, "-m", "ftkit", "train", str(recipe)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: model.trust_remote_code is true: running code shipped with" in done.stderr
    assert sentinel.read_text() == "ran"
