"""`ftkit train` with method moe_router on a MoE that `ftkit merge` built from two different fine-tunes:
only the routers move, the load-balancing loss is logged, and the report says where each val domain
routes. (The methods table's moe_router row checks loss, reload and LoRA on the experts.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.support.helpers import make_recipe, make_rows, read_metrics, run_cli, write_jsonl


def mixed_rows(n: int, seed: int) -> list[dict]:
    """The tiny extraction task and its reverse, alternating, each row with its `domain`."""
    rows = []
    for i, row in enumerate(make_rows(n, seed)):
        if i % 2:
            rows.append({**row, "domain": "extract"})
        else:
            rows.append(
                {"instruction": "Describe.", "input": row["output"], "output": row["input"], "domain": "describe"}
            )
    return rows


@pytest.fixture(scope="module")
def moe_dir(trained_runs, tmp_path_factory) -> Path:
    lora, full = trained_runs["lora"], trained_runs["full"]
    root = tmp_path_factory.mktemp("moe")
    experts = [
        {"model": str(lora), "prompts": ["A red cube of size 3."]},
        {"model": str(full), "prompts": ["Describe."]},
    ]
    (root / "moe.yaml").write_text(yaml.safe_dump({"method": "moe", "base": str(lora / "base"), "experts": experts}))
    code, _, err = run_cli("merge", "--config", str(root / "moe.yaml"), "--out", str(root / "moe"))
    assert code == 0, err
    return root / "moe"


def test_router_training_moves_only_the_routers_and_reports_routing(moe_dir, tmp_path):
    from safetensors.torch import load_file

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", mixed_rows(48, 1))
    write_jsonl(data / "val.jsonl", mixed_rows(16, 2))
    recipe = make_recipe(
        tmp_path,
        data,
        name="router",
        model={"name": str(moe_dir)},
        method={"name": "moe_router", "aux_loss_coef": 0.05},
        train={"lr": 3e-2, "max_steps": 8, "samples": 0},
    )
    code, out, err = run_cli("train", str(recipe))
    assert code == 0, err
    run = tmp_path / "runs" / "router"
    before, after = load_file(moe_dir / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == {name for name in before if name.endswith("block_sparse_moe.gate.weight")}
    train, _ = read_metrics(run)
    # N · Σ f_e P_e ≥ top_k = 2 with 2 experts, top-2: the penalty is coef × aux, logged apart from loss
    assert all(r["reg_loss"] == pytest.approx(0.05 * 2, rel=1e-4) for r in train)
    routing = json.loads((run / "routing.json").read_text())
    assert routing["experts"] == 2 and set(routing["after"]) == set(routing["before"]) == {"describe", "extract"}
    for figures in routing["after"].values():
        assert figures["rows"] == 8 and sum(figures["share"]) == pytest.approx(1.0)
    report = (run / "report.md").read_text()
    assert "## Routing" in report and "| describe | 8 |" in report and "| extract | 8 |" in report
    code, _, err = run_cli("eval", str(run), "--no-generation")  # final/ is a plain Mixtral that eval loads
    assert code == 0, err


def test_moe_router_on_a_dense_model_is_refused(tiny_data, tmp_path):
    recipe = make_recipe(tmp_path, tiny_data, name="dense", method={"name": "moe_router"})
    code, _, err = run_cli("train", str(recipe))
    assert code == 2, err
    assert "moe_router trains the routers of a mixture of experts" in err and "ftkit merge" in err
    assert not (tmp_path / "runs" / "dense").exists()
