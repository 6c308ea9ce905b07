"""The data order ignores the micro-batch (issue 15 part 2): batch_size × grad_accum = 4 as 4 × 1,
2 × 2 and 1 × 4 trains on the same examples in every step, so the three runs log the same losses
for SFT, DPO and classification (2 processes × batch_size 2: tests/e2e/test_distributed.py). And a
run resumed with another split of the same product continues the same trajectory.

fp32, dropout 0, an epoch over the data (its last step is short: 30 examples in steps of 4). The
runs add the same token losses in another order (other micro-batches, other padding widths), so
losses agree to fp32 summation noise: 1e-6 (absolute, on losses of 0.7 to 5), while one example more or less in a step
moves a loss by ~1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.classification_data import write_class_data
from tests.support.helpers import make_recipe, read_metrics, run_cli

ROOT = Path(__file__).resolve().parents[2]
GEOMETRIES = [(4, 1), (2, 2), (1, 4)]
#: DPO's losses sit at ln 2 ± 1e-3 with gradients of norm ~0.07 on the random-init base, so Adam's
#: 1/√v amplifies the summation noise most there: measured ≤ 2.3e-6 apart by step 5 (SFT and
#: classification stay ≤ 1e-6); step 1, from identical weights, agrees to 1e-6 for every task
TOLERANCE = {"sft": 1e-6, "classification": 1e-6, "dpo": 5e-6}
#: Adam divides by √v, so fp noise in a near-zero gradient moves a weight by up to ~lr × noise / |g|: at the
#: tiny models' usual 1e-2 the three runs drift apart by ~1e-6 per step, at 1e-3 they stay within 1e-6
LR = 1e-3
N_EXAMPLES = 30  # not a multiple of 4: the epoch's last step has 2 examples


def _sections(task: str, tiny_data: Path, tmp: Path) -> tuple[Path, dict]:
    """(data dir, recipe sections) of `task`."""
    if task == "sft":
        return tiny_data, {}
    if task == "dpo":
        data = {"train": str(ROOT / "data/preference/train.jsonl"), "val": None, "format": "preference"}
        data["max_length"] = 256  # prompt and answer in bytes
        return tiny_data, {"data": data, "objective": {"name": "dpo"}}
    root = write_class_data(tmp / "class-data", n_train=N_EXAMPLES, n_val=8)
    return root, {"task": "classification", "data": {"val": None}}


def _train(tmp: Path, data_dir: Path, name: str, sections: dict, batch_size: int, grad_accum: int, *args: str):
    train = {"epochs": 1, "max_steps": None, "batch_size": batch_size, "grad_accum": grad_accum, "samples": 0}
    train["lr"] = LR
    train |= sections.get("train", {})
    data = {"max_samples": N_EXAMPLES, "max_length": 96} | sections.get("data", {})
    recipe = make_recipe(tmp, data_dir, name=name, **{**sections, "data": data, "train": train})
    code, _, err = run_cli("train", str(recipe), *args)
    return code, err, tmp / "runs" / name


@pytest.mark.parametrize("task", ["sft", "dpo", "classification"])
def test_three_geometries_of_one_step_log_the_same_losses(tmp_path, tiny_data, task):
    data_dir, sections = _sections(task, tiny_data, tmp_path)
    curves = {}
    for batch_size, grad_accum in GEOMETRIES:
        code, err, run_dir = _train(
            tmp_path, data_dir, f"{task}-{batch_size}x{grad_accum}", sections, batch_size, grad_accum
        )
        assert code == 0, err
        losses, _ = read_metrics(run_dir)
        curves[(batch_size, grad_accum)] = losses
    reference = curves[GEOMETRIES[0]]
    assert len(reference) == 8  # ceil(30 / 4): the same steps per epoch whatever the split
    for geometry, losses in curves.items():
        assert [r["step"] for r in losses] == [r["step"] for r in reference]
        assert [r["units"] for r in losses] == [r["units"] for r in reference], geometry  # the same examples
        assert losses[0]["loss"] == pytest.approx(reference[0]["loss"], abs=1e-6), geometry
        for mine, ref in zip(losses, reference, strict=True):
            assert mine["loss"] == pytest.approx(ref["loss"], abs=TOLERANCE[task]), (geometry, mine["step"])


def test_resume_with_another_split_of_the_same_step_continues_the_trajectory(tmp_path, tiny_data):
    """4 × 1 stopped at step 3 and resumed as 2 × 2 (the documented OOM fix): a note, and the losses
    of the uninterrupted 4 × 1 run. A changed product is still refused."""
    straight_code, err, straight = _train(tmp_path, tiny_data, "straight", {}, 4, 1)
    assert straight_code == 0, err
    cut = {"train": {"save_every": 3}}
    code, err, run_dir = _train(tmp_path, tiny_data, "cut", cut, 4, 1)
    assert code == 0, err
    (run_dir / "final").rename(run_dir / "final-unused")  # keep the run resumable from step-3 by name
    checkpoint = run_dir / "checkpoints" / "step-3"

    code, err, _ = _train(tmp_path, tiny_data, "cut", cut, 4, 2, "--resume", str(checkpoint))
    assert code == 2 and "train.grad_accum (1 → 2)" in err and "train.batch_size" not in err

    code, err, _ = _train(tmp_path, tiny_data, "cut", cut, 2, 2, "--resume", str(checkpoint))
    assert code == 0, err
    assert "note: resuming with train.batch_size × train.grad_accum 4 × 1 → 2 × 2" in err
    resumed, _ = read_metrics(run_dir)
    reference, _ = read_metrics(straight)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for mine, ref in zip(resumed, reference, strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], abs=TOLERANCE["sft"]), mine["step"]
    assert json.loads((run_dir / "summary.json").read_text())["facts"]["resumed_from_step"] == 3
