"""Model-merge maths against small hand-computed tensors, and the merge-config checks."""

from __future__ import annotations

import math

import pytest
import torch

from ftkit.commands.merge_models import MergeConfig, load_merge_config, merge_tensors, slerp
from ftkit.errors import RecipeError


def config(method: str, weights: list[float], **extra) -> MergeConfig:
    models = [{"model": f"m{i}", "weight": w} for i, w in enumerate(weights)]
    return MergeConfig(method=method, models=models, base="b" if method not in ("linear", "slerp") else None, **extra)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_linear_is_the_weighted_mean_or_sum():
    merged = merge_tensors(config("linear", [0.5, 0.5]), [t(1, 2), t(3, 4)])
    assert torch.equal(merged, t(2, 3))
    merged = merge_tensors(config("linear", [1.0, 3.0]), [t(1, 2), t(3, 4)])
    assert torch.allclose(merged, t((1 + 9) / 4, (2 + 12) / 4))
    merged = merge_tensors(config("linear", [1.0, 1.0], normalize=False), [t(1, 2), t(3, 4)])
    assert torch.equal(merged, t(4, 6))


def test_task_arithmetic_adds_weighted_task_vectors_to_the_base():
    # τ1 = (1, 0), τ2 = (0, 2): base + 1·τ1 + 0.5·τ2
    merged = merge_tensors(config("task_arithmetic", [1.0, 0.5]), [t(2, 1), t(1, 3)], base=t(1, 1))
    assert torch.equal(merged, t(2, 2))


def test_ties_trims_elects_signs_and_averages_the_agreeing():
    base = t(0, 0, 0, 0)
    tau1, tau2 = t(1, -2, 3, 0.5), t(-1.5, -1, 2, 0.1)
    # density 0.5 keeps the 2 largest magnitudes: τ1 → (0, -2, 3, 0), τ2 → (-1.5, 0, 2, 0)
    # elected sign of the sums (-1.5, -2, 5, 0) → (-, -, +, +); mean over the agreeing entries:
    # (-1.5)/1, (-2)/1, (3 + 2)/2, nothing agrees → 0
    merged = merge_tensors(config("ties", [1.0, 1.0], density=0.5), [tau1, tau2], base=base)
    assert torch.allclose(merged, t(-1.5, -2, 2.5, 0))


def test_dare_linear_drops_at_random_and_rescales():
    tau = torch.ones(20_000)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        merged = merge_tensors(config("dare_linear", [1.0], density=0.25), [tau], base=torch.zeros_like(tau))
    # each entry is dropped (0) or kept and rescaled by 1/density (4); the mean stays ≈ 1 (unbiased)
    assert set(merged.unique().tolist()) == {0.0, 4.0}
    assert merged.mean().item() == pytest.approx(1.0, abs=0.05)  # 20k Bernoulli(0.25) draws: σ of the mean ≈ 0.012


def test_dare_ties_keeps_only_agreeing_signs():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        merged = merge_tensors(
            config("dare_ties", [1.0, 1.0], density=0.5), [torch.full((1000,), 1.0), torch.full((1000,), -3.0)],
            base=torch.zeros(1000),
        )  # fmt: skip
    # kept τ1 entries are 2, kept τ2 entries -6; the elected sign per entry decides which survive:
    # 2 alone, -6 alone, both kept (sum -4 → only -6 survives), none (0)
    assert set(merged.unique().tolist()) <= {0.0, 2.0, -6.0}


def test_slerp_follows_the_arc():
    e1, e2 = t(1, 0), t(0, 1)
    assert torch.allclose(slerp(0.5, e1, e2), t(math.sqrt(0.5), math.sqrt(0.5)))  # halfway along the quarter circle
    assert torch.allclose(slerp(0.0, e1, e2), e1) and torch.allclose(slerp(1.0, e1, e2), e2)
    # parallel vectors: the arc degenerates, slerp falls back to linear interpolation
    assert torch.allclose(slerp(0.25, t(1, 1), t(3, 3)), t(1.5, 1.5))
    merged = merge_tensors(config("slerp", [1.0, 1.0], t=0.5), [e1, e2])
    assert torch.allclose(merged, t(math.sqrt(0.5), math.sqrt(0.5)))


def test_integer_tensors_are_copied_not_merged():
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(merge_tensors(config("linear", [0.3, 0.7]), [ids, ids * 5]), ids)


def test_config_problems_are_cited_by_line(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("method: slerp\nbase: x\nmodels:\n  - {model: a}\n")
    with pytest.raises(RecipeError) as err:
        load_merge_config(path)
    lines = err.value.problems
    assert any(line.startswith(f"{path}:3: models: slerp merges exactly two models") for line in lines), lines
    assert any(line.startswith(f"{path}:2: base: slerp does not use a base") for line in lines), lines
    path.write_text("method: ties\nmodles: []\ndensity: 2\n")
    with pytest.raises(RecipeError) as err:
        load_merge_config(path)
    text = "\n".join(err.value.problems)
    assert f"{path}:2: modles: unknown key (did you mean models?)" in text
    assert f"{path}:3: density:" in text


def test_readme_merge_config_is_valid(tmp_path):
    """The merge config shown in docs/after-training.md loads."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "after-training.md").read_text()
    block = page.split("```yaml\nmethod: ties", 1)[1].split("```", 1)[0]
    path = tmp_path / "merge.yaml"
    path.write_text("method: ties" + block)
    config = load_merge_config(path)
    assert config.method == "ties" and [m.weight for m in config.models] == [0.6, 0.4] and config.density == 0.5
