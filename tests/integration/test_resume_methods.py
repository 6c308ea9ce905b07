"""Exact resume of the methods that keep state besides their trainable weights (RELIABILITY.md R10):
Delta-LoRA's snapshot B_K A_K and AdaLoRA's sensitivity scores and rank pattern
(method_state.safetensors in each checkpoint), and LoRA-drop's layer
choice (lora_drop.json, read back instead of scoring again). "Exact" is tests/resume_helpers.py's:
every logged number and the final tensors bit-identical to the run that never stopped."""

from __future__ import annotations

import json

import pytest

from tests.support.resume_helpers import assert_same_run, reference_runs, sections, train

DELTA = sections(method={"name": "delta_lora", "r": 4, "alpha": 8, "dropout": 0.0, "start_step": 3})


@pytest.fixture(scope="module")
def variants(deep_micro_base) -> dict:
    return {
        "delta_lora": DELTA,
        # 12 steps: scores from step 1, budget cut every delta_t steps from tinit 2 until 12 - tfinal = 8,
        # then the final pattern re-applied each step
        "adalora": sections(
            method={"name": "adalora", "init_r": 8, "target_r": 2, "alpha": 16, "tinit": 2, "tfinal": 4, "delta_t": 2}
        ),
        # 4 layers, threshold 0.3: one or two keep their own LoRA, the others share; dropout 0.1 (BASE)
        "lora_drop": sections(
            model={"name": str(deep_micro_base)},
            method={
                "name": "lora_drop",
                **{"r": 4, "alpha": 8, "dropout": 0.1},
                **{"sample_fraction": 0.25, "sample_steps": 5, "threshold": 0.3},
            },
        ),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data, variants):
    return reference_runs(tmp_path_factory, tiny_data, "ref-methods", variants)


@pytest.mark.parametrize(
    ("fault", "resumes_from"),
    [
        ("sigterm@step:5", 5),  # after K = 3: the snapshot comes back from method_state.safetensors
        ("crash@step:3", 2),  # step-2 is before K: no snapshot yet; the resumed run takes it at step 3
    ],
)
def test_delta_lora_resume_equals_the_uninterrupted_run(tmp_path, tiny_data, reference, variants, fault, resumes_from):
    code, _, run_dir = train(tmp_path, tiny_data, "delta_lora", fault=fault, **variants["delta_lora"])
    assert code != 0
    state = run_dir / "checkpoints" / f"step-{resumes_from}" / "method_state.safetensors"
    assert state.is_file()
    code, err, run_dir = train(tmp_path, tiny_data, "delta_lora", "--resume")
    assert code == 0, err
    assert f"resuming from {run_dir}/checkpoints/step-{resumes_from}" in err
    assert_same_run(reference("delta_lora")[0], run_dir)


def test_lora_drop_resume_reads_its_choice_and_equals_the_uninterrupted_run(tmp_path, tiny_data, reference, variants):
    ref_dir, _ = reference("lora_drop")
    choice = json.loads((ref_dir / "lora_drop.json").read_text())
    assert len(choice["shared"]) >= 2  # the run did tie adapters together
    code, err, run_dir = train(tmp_path, tiny_data, "lora_drop", fault="sigterm@step:5", **variants["lora_drop"])
    assert code == 143 and "lora_drop: " in err
    assert json.loads((run_dir / "lora_drop.json").read_text()) == choice
    code, err, run_dir = train(tmp_path, tiny_data, "lora_drop", "--resume")
    assert code == 0, err
    assert "lora_drop: " not in err  # read back, not scored again
    assert_same_run(ref_dir, run_dir)
    facts = [json.loads((d / "summary.json").read_text())["facts"] for d in (run_dir, ref_dir)]
    assert facts[0]["trainable_params"] == facts[1]["trainable_params"]


@pytest.mark.parametrize("fault", ["sigterm@step:5", "sigterm@step:9"])  # while reallocating; after the final cut
def test_adalora_resume_restores_scores_and_rank_pattern(tmp_path, tiny_data, reference, variants, fault):
    code, _, run_dir = train(tmp_path, tiny_data, "adalora", fault=fault, **variants["adalora"])
    assert code == 143
    code, err, run_dir = train(tmp_path, tiny_data, "adalora", "--resume")
    assert code == 0, err
    ref_dir, _ = reference("adalora")
    assert_same_run(ref_dir, run_dir)
    pattern = json.loads((run_dir / "final" / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern == json.loads((ref_dir / "final" / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and not all(all(mask) for mask in pattern.values())  # the budget did cut ranks


# --- bottleneck adapters, AdapterFusion and LLaMA-Adapter: their weights are all their state ----------------------

ADAPTER_VARIANTS = {
    "adapter": {"method": {"name": "adapter", "config": "houlsby", "reduction_factor": 4}},
    "llama_adapter": {"method": {"name": "llama_adapter", "adapter_len": 4, "adapter_layers": 2}},
}


@pytest.fixture(scope="module")
def adapter_variants(pretrained_base, bottleneck_adapter_runs) -> dict:
    found = {name: sections(**variant) for name, variant in ADAPTER_VARIANTS.items()}
    found["adapter_fusion"] = sections(
        model={"name": str(pretrained_base)},
        method={"name": "adapter_fusion", "adapters": [str(run) for run in bottleneck_adapter_runs]},
    )
    return found


@pytest.mark.parametrize("name", ["adapter", "adapter_fusion", "llama_adapter"])
def test_adapter_methods_resume_equals_the_uninterrupted_run(
    tmp_path_factory, tmp_path, tiny_data, adapter_variants, name
):
    """A checkpoint of a bottleneck run holds the adapters only (not the base), and resuming from it is exact."""
    reference = reference_runs(tmp_path_factory, tiny_data, f"ref-{name}", adapter_variants)
    code, _, run_dir = train(tmp_path, tiny_data, name, fault="sigterm@step:5", **adapter_variants[name])
    assert code == 143
    if name != "llama_adapter":
        saved = sorted(p.name for p in (run_dir / "checkpoints" / "step-4").glob("*.safetensors"))
        assert saved == ["bottleneck_model.safetensors", "optimizer.safetensors", "rng.safetensors"]
    code, err, run_dir = train(tmp_path, tiny_data, name, "--resume")
    assert code == 0, err
    assert_same_run(reference(name)[0], run_dir)
