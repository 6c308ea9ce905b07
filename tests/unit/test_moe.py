"""Mixture of experts pieces without a model: router initialisation, the degenerate-gate figure, the
config rules, and report.md's Routing section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftkit.commands.merge_moe import MoeConfig, gate_max_cosine, gate_rows, moe_rule_problems
from ftkit.report.routing import routing_section


def config(**extra) -> MoeConfig:
    experts = [{"model": "a", "prompts": ["x"]}, {"model": "b", "prompts": ["y"]}, {"model": "c", "prompts": ["z"]}]
    return MoeConfig.model_validate({"method": "moe", "base": "base", "experts": experts, **extra})


def test_random_routers_are_seeded_unit_rows_and_uniform_are_zero():
    a = gate_rows(config(gate="random", seed=3), Path("unused"), layers=4, hidden=16)
    b = gate_rows(config(gate="random", seed=3), Path("unused"), layers=4, hidden=16)
    assert a.shape == (4, 3, 16) and torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(4, 3))
    assert not torch.equal(a, gate_rows(config(gate="random", seed=4), Path("unused"), 4, 16))
    assert torch.count_nonzero(gate_rows(config(gate="uniform"), Path("unused"), 4, 16)) == 0


def test_gate_max_cosine_finds_the_most_parallel_pair():
    rows = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    assert gate_max_cosine(rows) == pytest.approx(2**-0.5)
    assert gate_max_cosine(torch.zeros(1, 2, 2)) is None


def test_rules():
    assert moe_rule_problems(config()) == []
    assert [p for p, _ in moe_rule_problems(config(experts_per_token=4))] == [("experts_per_token",)]
    one = MoeConfig.model_validate({"method": "moe", "base": "b", "experts": [{"model": "a"}], "gate": "random",
                                    "experts_per_token": 1})  # fmt: skip
    assert [p for p, _ in moe_rule_problems(one)] == [("experts",)]
    no_prompts = config()
    no_prompts.experts[2].prompts = []
    assert [p for p, _ in moe_rule_problems(no_prompts)] == [("experts", 2, "prompts")]


def test_routing_section_shows_after_and_before_per_domain(tmp_path):
    assert routing_section(tmp_path) == ""
    figures = {"rows": 5, "tokens": 50, "mean_prob": [0.5, 0.5]}
    routing = {
        "experts": 2,
        "before": {"extract": {**figures, "share": [0.5, 0.5], "top_expert": 0}},
        "after": {"extract": {**figures, "share": [0.9, 0.1], "top_expert": 0}},
    }
    (tmp_path / "routing.json").write_text(json.dumps(routing))
    section = routing_section(tmp_path)
    assert "## Routing" in section
    assert "| extract | 5 | 90.0% (50.0%) | 10.0% (50.0%) | 0 (was 0) |" in section


def test_a_random_init_builtin_base_is_refused_naming_what_to_give():
    from ftkit.commands.merge_moe import base_dir
    from ftkit.errors import ModelError

    with pytest.raises(ModelError, match="random-init built-in.*base/ folder"):
        base_dir("builtin:micro-llama")
