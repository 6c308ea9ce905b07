"""Real `kill -9` and a second signal (RELIABILITY.md R10, R12, R18), in child processes.

A child `python -m ftkit train` is killed with SIGKILL at a fault point (tests/support/faults.py)
(after a step, or inside a checkpoint save: nothing of the process's own cleanup runs).
Then the run is resumed, here in-process, and must equal the uninterrupted run bit for bit.

The kill points are drawn at random once, from a fixed seed, so CI is reproducible; set
FTKIT_KILL_SEED to draw others. The default suite tries KILL_POINTS (3 points); `-m slow`
adds SLOW_KILL_POINTS (every save phase on every variant).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.support.faults import subprocess_env
from tests.support.helpers import make_recipe
from tests.support.resume_helpers import (
    ROOT,
    assert_same_run,
    recorded_batches,
    reference_runs,
    sections,
    train,
    train_subprocess,
)

SAVE_PHASES = ("save-weights", "save-optimizer", "save-complete")
VARIANTS = {
    "lora": sections(),
    "accum2": sections(train={"grad_accum": 2, "max_steps": 6}),
    "paged8_accum2": sections(
        method={"modules_to_save": ["embed_tokens", "lm_head"]},
        train={"optimizer": "paged_adamw_8bit", "grad_accum": 2, "max_steps": 6},
    ),
}


def _draw(seed: int) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
    """(default points, slow points): (variant, point, step); saves happen at even steps (save_every 2)."""
    rng = random.Random(seed)
    steps = {name: v["train"]["max_steps"] for name, v in VARIANTS.items()}
    phases = rng.sample(SAVE_PHASES, 2)  # two different moments inside a save
    default = [
        ("lora", "step", rng.choice([s for s in range(2, steps["lora"]) if s % 2])),  # between two saves
        ("paged8_accum2", phases[0], rng.choice(range(4, steps["paged8_accum2"], 2))),
        ("accum2", phases[1], rng.choice(range(4, steps["accum2"], 2))),
    ]
    slow = [
        (name, phase, rng.choice(range(4, steps[name], 2)))
        for name in VARIANTS
        for phase in (*SAVE_PHASES, "save-renamed")
    ] + [(name, "step", rng.randrange(2, steps[name])) for name in VARIANTS]
    return default, slow


KILL_POINTS, SLOW_KILL_POINTS = _draw(int(os.environ.get("FTKIT_KILL_SEED", "2024")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    return reference_runs(tmp_path_factory, tiny_data, "kill-ref", VARIANTS)


def kill_and_resume(tmp_path, tiny_data, reference, variant: str, point: str, step: int) -> None:
    done = train_subprocess(tmp_path, tiny_data, variant, f"kill@{point}:{step}", **VARIANTS[variant])
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    run_dir = tmp_path / "runs" / variant
    checkpoints = run_dir / "checkpoints"
    complete = sorted(int(p.name[5:]) for p in checkpoints.glob("step-*") if (p / "complete.json").is_file())
    if point == "step":
        expected = step - step % 2
    elif point == "save-renamed":
        expected = step
    else:  # killed inside the save of `step`: that checkpoint is staged, never complete
        expected = step - 2
        assert list(checkpoints.glob(f".step-{step}.tmp-*")), "the killed save left no staging dir"
        assert not (checkpoints / f"step-{step}").exists()
    assert complete[-1] == expected

    accum = VARIANTS[variant]["train"].get("grad_accum", 1)
    with recorded_batches() as seen:
        code, err, _ = train(tmp_path, tiny_data, variant, "--resume")
    assert code == 0, err
    ref_dir, ref_seen = reference(variant)
    assert seen == ref_seen[expected * accum :]  # the resumed part draws exactly the batches still to come
    assert_same_run(ref_dir, run_dir)
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")], "stale staging dirs were not cleaned"


@pytest.mark.parametrize(("variant", "point", "step"), KILL_POINTS)
def test_kill_9_then_resume_equals_uninterrupted(tmp_path, tiny_data, reference, variant, point, step):
    kill_and_resume(tmp_path, tiny_data, reference, variant, point, step)


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "point", "step"), SLOW_KILL_POINTS)
def test_kill_9_at_every_save_phase(tmp_path, tiny_data, reference, variant, point, step):
    kill_and_resume(tmp_path, tiny_data, reference, variant, point, step)


def test_second_sigint_mid_save_aborts_and_keeps_the_last_checkpoint(tmp_path, tiny_data, reference):
    """R18: SIGINT while checkpoint 4 is being written asks for a stop; a second SIGINT aborts
    at once (exit 130) — step-2 stays complete, the staging dir is never loaded, the resume is exact."""
    recipe = make_recipe(tmp_path, tiny_data, name="lora", **VARIANTS["lora"])
    child = subprocess.Popen(
        [sys.executable, "-m", "ftkit", "train", str(recipe)],
        cwd=ROOT,
        env=subprocess_env("stall@save-weights:4"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in child.stderr:
            if line.startswith("ftkit-test-fault: stalled at save-weights:4"):
                break
        else:
            pytest.fail("the child never reached the stalled save")
        child.send_signal(signal.SIGINT)
        time.sleep(0.5)  # let the first handler run before the second signal arrives
        child.send_signal(signal.SIGINT)
        rest = child.stderr.read()
        assert child.wait(timeout=60) == 130
    finally:
        child.kill()
    assert "aborting now" in rest
    checkpoints = tmp_path / "runs" / "lora" / "checkpoints"
    assert (checkpoints / "step-2" / "complete.json").is_file()
    assert not (checkpoints / "step-4").exists() and list(checkpoints.glob(".step-4.tmp-*"))

    code, err, run_dir = train(tmp_path, tiny_data, "lora", "--resume")
    assert code == 0, err
    assert_same_run(reference("lora")[0], run_dir)
