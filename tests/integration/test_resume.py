"""Exact resume (RELIABILITY.md R9-R12, R15): a run stopped and resumed equals the run that never stopped.

"Equals" is bit-identical: every logged loss, LR, grad norm, val loss and token count, the
examples of every micro-batch in order, and the final tensors (CPU, fp32, dropout 0.1 so the
RNG state matters). Runs are stopped in-process by injected faults (tests/support/faults.py):
a signal (the loop stops at a step boundary and saves) or a crash (the newest periodic
checkpoint is older, so the resumed run redoes steps). Real `kill -9` runs are in test_kill.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.test_readme import DOCS, blocks, short_val
from tests.support.faults import injected
from tests.support.helpers import run_cli
from tests.support.resume_helpers import (
    ROOT,
    assert_same_run,
    recorded_batches,
    reference_runs,
    sections,
    train,
    trajectory,
    tree_digest,
)

VARIANTS = {
    "lora": sections(),
    # 4 optimizer steps per epoch: 6 steps cross into epoch 1
    "accum2": sections(train={"grad_accum": 2, "max_steps": 6}),
    "full": sections(method={"name": "full"}, train={"lr": 3e-3, "max_steps": 6}),
    # embed_tokens and lm_head (262 x 64 = 16768 elements each) train in full, so the 8-bit optimizers
    # keep real 8-bit state for them, sharing one quantile map; bitsandbytes keeps 32-bit state for
    # tensors under 4096 elements (the LoRA factors)
    **{
        opt: sections(method={"modules_to_save": ["embed_tokens", "lm_head"]}, train={"optimizer": opt, "max_steps": 6})
        for opt in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
    },
    # S²-Attn in training (G = 32 on rows of 60-90 tokens), embeddings and norms in full, and a base/
    # rewritten with linear RoPE when the resumed run rebuilds the model
    "longlora": sections(
        method={"name": "longlora", "r": 4, "alpha": 8, "dropout": 0.1, "rope_scaling_factor": 2.0},
        train={"max_steps": 6},
    ),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    """The uninterrupted run of a variant and its micro-batches, made once per module on first use."""
    return reference_runs(tmp_path_factory, tiny_data, "ref", VARIANTS)


def stop_and_resume(tmp: Path, data: Path, variant: str, *faults: str) -> tuple[Path, list[list[str]], list[int]]:
    """Run `variant`, stopping it once per fault and resuming it after each; return the run,
    the micro-batches of every part joined, and the step each resume started from."""
    parts, starts = [], []
    code, err, run_dir = None, "", None
    for i, fault in enumerate([*faults, None]):
        args = ("--resume",) if i else ()
        if i:
            starts.append(_newest_step(run_dir))
            del parts[starts[-1] * VARIANTS[variant]["train"].get("grad_accum", 1) :]  # redone after the resume
        with recorded_batches() as seen:
            code, err, run_dir = train(tmp, data, variant, *args, fault=fault, **VARIANTS[variant])
        parts += seen
        if fault is not None:
            assert code != 0, f"{fault} did not stop the run"
    assert code == 0, err
    return run_dir, parts, starts


def _newest_step(run_dir: Path) -> int:
    steps = [
        int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if (p / "complete.json").exists()
    ]
    return max(steps)


@pytest.mark.parametrize(
    ("fault", "resumes_from"),
    [
        ("sigterm@step:5", 5),  # mid-epoch: the signal's own checkpoint
        ("sigint@step:8", 8),  # the epoch boundary: 8 of 8 micro-batches done
        ("crash@step:5", 4),  # a crash: the periodic checkpoint at 4, step 5 is redone
        ("crash@save-optimizer:6", 4),  # a crash inside the save of step 6: step-4 is the newest complete
    ],
)
def test_resume_equals_the_uninterrupted_run(tmp_path, tiny_data, reference, fault, resumes_from):
    run_dir, seen, starts = stop_and_resume(tmp_path, tiny_data, "lora", fault)
    ref_dir, ref_seen = reference("lora")
    assert starts == [resumes_from]
    assert seen == ref_seen
    assert_same_run(ref_dir, run_dir)
    assert not list((run_dir / "checkpoints").glob(".step-*")), "a staging dir was left behind"


def test_signal_stops_at_the_step_boundary_with_130_or_143(tmp_path, tiny_data):
    code, err, run_dir = train(tmp_path, tiny_data, "lora", fault="sigterm@step:3", **VARIANTS["lora"])
    assert code == 143
    assert err.strip().splitlines()[-1].startswith("interrupted: SIGTERM at step 3 of 12; saved ")
    assert "--resume" in err.strip().splitlines()[-1]
    assert max(r["step"] for r in trajectory(run_dir)) == 3  # nothing of step 4 ran
    state = json.loads((run_dir / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (3, 0, 3)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["facts"]["status"] == "interrupted by SIGTERM at step 3"
    assert "interrupted by SIGTERM at step 3" in (run_dir / "report.md").read_text()
    assert not (run_dir / "final").exists()

    code, err, _ = train(tmp_path, tiny_data, "lora", "--resume", fault="sigint@step:4")
    assert code == 130 and "interrupted: SIGINT at step 4" in err


def test_resume_with_grad_accum(tmp_path, tiny_data, reference):
    # step 3 of 4 per epoch: the position is micro-batch 6 of 8
    run_dir, seen, _ = stop_and_resume(tmp_path, tiny_data, "accum2", "sigterm@step:3")
    ref_dir, ref_seen = reference("accum2")
    assert seen == ref_seen
    assert_same_run(ref_dir, run_dir)


@pytest.mark.parametrize("variant", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "full", "longlora"])
def test_resume_with_each_optimizer_and_full_weights(tmp_path, tiny_data, reference, variant):
    run_dir, seen, starts = stop_and_resume(tmp_path, tiny_data, variant, "crash@step:3")
    ref_dir, ref_seen = reference(variant)
    assert starts == [2]
    assert seen == ref_seen
    assert_same_run(ref_dir, run_dir)
    if "8bit" in variant:  # the 8-bit path really ran: 2 moments x 2 tensors stored as uint8
        state = load_file(run_dir / "checkpoints" / "step-2" / "optimizer.safetensors")
        assert sum(t.dtype == torch.uint8 and t.numel() == 262 * 64 for t in state.values()) == 4


def test_double_resume_inside_one_epoch(tmp_path, tiny_data, reference):
    # 8 micro-batches per epoch: stops after steps 2 and 5 are both inside epoch 0
    run_dir, seen, starts = stop_and_resume(tmp_path, tiny_data, "lora", "sigterm@step:2", "sigterm@step:5")
    ref_dir, ref_seen = reference("lora")
    assert starts == [2, 5]
    assert seen == ref_seen
    assert_same_run(ref_dir, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())["facts"]
    saved = json.loads((run_dir / "checkpoints" / "step-5" / "trainer_state.json").read_text())
    assert summary["resumed_from_step"] == 5 and summary["wall_s"] >= saved["wall_s"]


def test_same_seed_twice_is_identical(tmp_path, tiny_data, reference):
    """R9: two runs with one seed give the same metrics and the same adapter file, byte for byte."""
    _, _, run_dir = train(tmp_path, tiny_data, "lora", **VARIANTS["lora"])
    ref_dir, _ = reference("lora")
    assert trajectory(run_dir) == trajectory(ref_dir)

    def sha(d: Path) -> str:
        return hashlib.sha256((d / "final" / "adapter_model.safetensors").read_bytes()).hexdigest()

    assert sha(run_dir) == sha(ref_dir)


def test_resume_from_a_named_checkpoint_and_over_a_torn_metrics_line(tmp_path, tiny_data, reference):
    code, _, run_dir = train(tmp_path, tiny_data, "lora", fault="crash@step:7", **VARIANTS["lora"])
    assert code == 1
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "loss": 4.1')  # a line torn by a kill mid-write
    code, err, _ = train(tmp_path, tiny_data, "lora", "--resume", str(run_dir / "checkpoints" / "step-4"))
    assert code == 0, err
    assert "resuming from" in err and "step-4" in err
    assert_same_run(reference("lora")[0], run_dir)


def test_resume_guard_refuses_trajectory_changes_and_allows_cadence(tmp_path, tiny_data, reference):
    """R15: a changed method.r or seed is refused, naming each key; eval/save cadence may change."""
    code, _, run_dir = train(tmp_path, tiny_data, "lora", fault="sigterm@step:4", **VARIANTS["lora"])
    assert code == 143
    before = tree_digest(run_dir)
    code, err, _ = train(tmp_path, tiny_data, "lora", "--resume", "--set", "method.r=8", "--set", "train.seed=7")
    assert code == 2
    assert err.count("\n") == 1, err  # one line
    assert "method.r (4 → 8)" in err and "train.seed (42 → 7)" in err
    assert tree_digest(run_dir) == before, "a refused resume must not touch the run"

    code, err, _ = train(tmp_path, tiny_data, "lora", "--resume", "--set", "train.eval_every=2")
    assert code == 0, err
    assert "note: resuming with train.eval_every changed (3 → 2)" in err
    ref_train = [r for r in trajectory(reference("lora")[0]) if "loss" in r]
    assert [r for r in trajectory(run_dir) if "loss" in r] == ref_train


def test_resume_refusals_name_the_problem(tmp_path, tiny_data):
    train_cfg = {**VARIANTS["lora"]["train"], "max_steps": 3, "save_every": None}
    code, err, run_dir = train(
        tmp_path, tiny_data, "lora", "--resume", method=VARIANTS["lora"]["method"], train=train_cfg
    )
    assert code == 2 and "holds no ftkit run" in err
    code, err, _ = train(tmp_path, tiny_data, "lora")
    assert code == 0, err
    code, err, _ = train(tmp_path, tiny_data, "lora", "--resume")
    assert code == 2 and "no complete checkpoint" in err
    code, err, _ = train(tmp_path, tiny_data, "lora", "--resume", "--overwrite")
    assert code == 2 and "give one of them" in err
    code, err, _ = train(tmp_path, tiny_data, "lora", str(run_dir / "checkpoints" / "step-1"))
    assert code == 2 and "only read with --resume" in err
    elsewhere = tmp_path / "other" / "checkpoints" / "step-1"
    elsewhere.mkdir(parents=True)
    code, err, _ = train(tmp_path, tiny_data, "lora", "--resume", str(elsewhere))
    assert code == 2 and "not a checkpoint of the run directory" in err


def test_damaged_or_finished_runs_are_not_resumed(tmp_path, tiny_data):
    code, _, run_dir = train(tmp_path, tiny_data, "lora", fault="crash@step:5", **VARIANTS["lora"])
    assert code == 1
    weights = run_dir / "checkpoints" / "step-4" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, err, _ = train(tmp_path, tiny_data, "lora", "--resume")
    assert code == 2 and f"{weights}: damaged" in err

    code, err, _ = train(tmp_path, tiny_data, "lora", "--resume", str(run_dir / "checkpoints" / "step-2"))
    assert code == 0, err
    code, err, _ = train(tmp_path, tiny_data, "lora", "--resume")
    assert code == 2 and "has finished" in err


def test_readme_stop_and_resume_commands(smollm2, tmp_path, monkeypatch):
    """The README's three commands on the shipped quickstart (the real SmolLM2), shortened to 3 steps
    of 4 rows and 8 val rows. The commands are docs/reliability.md's."""
    block = next(b for b in blocks("", DOCS / "reliability.md") if b.startswith("ftkit train recipes/quickstart.yaml"))
    assert [line.split("#")[0].split() for line in block.splitlines()] == [
        ["ftkit", "train", "recipes/quickstart.yaml"],
        ["ftkit", "train", "recipes/quickstart.yaml", "--resume"],
        ["ftkit", "train", "recipes/quickstart.yaml", "--resume", "runs/quickstart/checkpoints/step-100"],
    ]
    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / "quickstart"
    shorter = [f"--set=train.{key}" for key in ("max_steps=3", "save_every=1", "samples=0", "batch_size=4")]
    common = [*shorter, f"--set=data.val={short_val(tmp_path)}", "--output-dir", str(run_dir)]
    with injected("sigint@step:2"):  # the user's Ctrl-C after step 2
        code, out, err = run_cli("train", "recipes/quickstart.yaml", *common)
    assert code == 130 and out == "", err
    code, out, err = run_cli("train", "recipes/quickstart.yaml", "--resume", *common)
    assert code == 0 and out == "", err
    first = trajectory(run_dir)
    code, out, err = run_cli(
        "train", "recipes/quickstart.yaml", "--resume", str(run_dir / "checkpoints/step-1"), *common
    )
    assert code == 0 and out == "", err
    assert trajectory(run_dir) == first  # the same steps again, the same numbers
