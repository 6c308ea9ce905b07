"""bf16 that learns (issue 15 part 1): full fine-tuning at lr 1e-5 on a bfloat16 model makes the
progress of a float32 run with fp32 master weights (the default) or Kahan-compensated bf16 updates,
where plain bf16 rounds most updates away. Through the CLI, as a user runs it (CPU computes bf16
matmuls as a GPU would round them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.helpers import make_recipe, read_metrics, run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision in it; a
    user's `ftkit train` is one process, these tests train bf16 and fp32 runs in one. Reset it around
    each run (accelerate's own tests do the same) so the next test starts as a new process would."""
    yield _reset_accelerate
    _reset_accelerate()


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)[0]]


def test_bf16_full_fine_tuning_makes_fp32_progress_on_micro_llama(tmp_path, tiny_data):
    """micro-llama, 40 steps of 4 examples at 1e-5: the loss drop of each bf16 choice against float32's.
    Measured: float32 0.0853, fp32 masters 0.0856, kahan 0.0854, plain bf16 0.0049. 5 % allows for the
    bf16 matmuls' own rounding of the logged losses (~1e-3)."""
    drops, facts = {}, {}
    for dtype, choice in (("float32", "fp32"), ("bfloat16", "fp32"), ("bfloat16", "kahan"), ("bfloat16", "none")):
        name = f"{dtype}-{choice}"
        recipe = make_recipe(
            tmp_path,
            tiny_data,
            name=name,
            model={"name": "builtin:micro-llama", "dtype": dtype},
            method={"name": "full"},
            data={"val": None, "max_length": 64},
            train={"lr": 1e-5, "max_steps": 40, "batch_size": 4, "samples": 0, "master_weights": choice},
        )
        _reset_accelerate()
        code, _, err = run_cli("train", str(recipe))
        assert code == 0, err
        losses = _losses(tmp_path / "runs" / name)
        drops[name] = losses[0] - losses[-1]
        facts[name] = json.loads((tmp_path / "runs" / name / "summary.json").read_text())["facts"]
    reference = drops["float32-fp32"]
    assert reference > 0
    assert drops["bfloat16-fp32"] == pytest.approx(reference, rel=0.05)
    assert drops["bfloat16-kahan"] == pytest.approx(reference, rel=0.05)
    assert drops["bfloat16-none"] < 0.6 * reference  # the failure the default avoids
    assert facts["bfloat16-fp32"]["trained_weights"] == "fp32 master weights, bfloat16 compute"
    assert facts["bfloat16-kahan"]["trained_weights"] == "bfloat16 weights with a Kahan-compensated update"
    assert facts["float32-fp32"]["trained_weights"] == "float32 weights (no master copy needed)"
    report = (tmp_path / "runs" / "bfloat16-fp32" / "report.md").read_text()
    assert "fp32 master weights, bfloat16 compute" in report


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["fp32", "kahan"])
def test_quickstart_full_in_bf16_is_within_2_percent_of_fp32_at_step_40(tmp_path, monkeypatch, choice):
    """The issue's table: `recipes/quickstart-full.yaml --set train.lr=1e-5 --set train.max_steps=40`.
    Measured: float32 5.0787, bf16 fp32 masters 5.0736, bf16 kahan 5.0739, plain bf16 5.5171."""
    monkeypatch.chdir(ROOT)
    common = ["--set", "train.lr=1e-5", "--set", "train.max_steps=40", "--set", "train.samples=0"]
    common += ["--set", "train.eval_every=null", "--set", "train.save_every=null"]
    final = {}
    for dtype, mw in (("float32", "fp32"), ("bfloat16", choice)):
        out = tmp_path / f"{dtype}-{mw}"
        args = [*common, "--set", f"model.dtype={dtype}", "--set", f"train.master_weights={mw}", "--output-dir"]
        _reset_accelerate()
        code, _, err = run_cli("train", "recipes/quickstart-full.yaml", *args, str(out))
        assert code == 0, err
        final[dtype] = _losses(out)[-1]
    assert final["bfloat16"] == pytest.approx(final["float32"], rel=0.02)
