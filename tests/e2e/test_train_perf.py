"""`ftkit train` with the speed and memory knobs on, as a user runs it: packing with
checkpoint offload learns, and summary.json carries the speed facts."""

from __future__ import annotations

import json

from tests.helpers import make_recipe, read_metrics, run_cli


def test_packed_offloaded_run_learns_and_reports_speed(tmp_path, tiny_data):
    recipe = make_recipe(
        tmp_path,
        tiny_data,
        name="packed",
        model={"name": "builtin:micro-llama", "gradient_checkpointing": "offload"},
        data={"packing": True, "max_length": 256},
        train={"batch_size": 3, "max_steps": 20},
    )
    code, out, err = run_cli("train", str(recipe))
    assert code == 0, err
    assert out == "" and "packed rows" in err
    run_dir = tmp_path / "runs" / "packed"
    train, val = read_metrics(run_dir)
    losses = [r["loss"] for r in train]
    assert sum(losses[-5:]) / 5 <= 0.9 * sum(losses[:5]) / 5
    facts = json.loads((run_dir / "summary.json").read_text())["facts"]
    # 64 examples of ~80 tokens: about 3 fit a 256-token row
    assert facts["packing"]["enabled"] and facts["packing"]["rows"] <= facts["train_examples"] / 2.5
    assert 0.7 < facts["packing"]["efficiency"] <= 1.0
    # a micro-step of 3 packed rows holds ~9 examples (the epoch's last batch may hold one row)
    assert sorted(r["tokens"] for r in train)[len(train) // 2] > 3 * 2 * 70
    assert facts["train_tokens_per_s"] > facts["tokens_per_s"] > 0  # step time excludes loading and eval
    assert facts["peak_rss_bytes"] > 100 * 2**20
    assert facts["mfu"] is None  # CPU: no peak FLOP/s to compare against
