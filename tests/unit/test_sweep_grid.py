"""`ftkit sweep`'s grid (parsing, naming, combinations) and `ftkit compare`'s verdict and curves, as functions."""

from __future__ import annotations

import pytest

from ftkit.commands.compare import curves, labels_for, verdict
from ftkit.commands.sweep import grid_points, parse_grid, point_name, split_values
from ftkit.data.fingerprint import val_fingerprint, val_fingerprint_or_none
from ftkit.errors import ArgumentError
from ftkit.recipe.schema import DataSection
from tests.support.helpers import make_rows, write_jsonl


def test_values_split_on_top_level_commas_only():
    assert split_values("1e-4,3e-4, 1e-3") == ["1e-4", "3e-4", "1e-3"]
    assert split_values("[q_proj,v_proj],all-linear") == ["[q_proj,v_proj]", "all-linear"]
    assert split_values("{a: 1, b: 2},'x,y'") == ["{a: 1, b: 2}", "'x,y'"]


def test_grid_points_are_every_combination_first_axis_slowest_named_by_overrides():
    points = grid_points(parse_grid(["train.lr=1e-4,3e-4", "method.name=lora,qlora"]))
    assert [p.overrides for p in points] == [
        ["train.lr=1e-4", "method.name=lora"],
        ["train.lr=1e-4", "method.name=qlora"],
        ["train.lr=3e-4", "method.name=lora"],
        ["train.lr=3e-4", "method.name=qlora"],
    ]
    assert [p.name for p in points][:2] == ["lr=1e-4,method.name=lora", "lr=1e-4,method.name=qlora"]


def test_point_names_are_safe_folder_names():
    assert point_name(["model.name=org/some model"]) == "model.name=org_some_model"
    assert point_name(["method.target_modules=[q_proj,v_proj]"]) == "method.target_modules=_q_proj,v_proj_"


@pytest.mark.parametrize(
    ("grid", "says"),
    [
        (["train.lr"], "expected key.path=value1,value2"),
        (["=1,2"], "expected key.path=value1,value2"),
        (["train..lr=1"], "is not a key path"),
        (["train.lr=1e-4,,3e-4"], "an empty value"),
        (["train.lr=1e-4,1e-4"], "given twice"),
        (["train.lr=1e-4", "train.lr=3e-4"], "put all its values in one --grid"),
        (["method.target_modules=[q_proj"], "cannot read the value"),
        ([], "give at least one"),
    ],
)
def test_malformed_grids_are_argument_errors_naming_the_grid(grid, says):
    with pytest.raises(ArgumentError, match="--grid") as err:
        grid_points(parse_grid(grid))
    assert says in str(err.value)


def test_values_that_name_the_same_folder_are_refused():
    with pytest.raises(ArgumentError, match="share the run directory"):
        grid_points(parse_grid(["model.name=a/b,a_b"]))


def test_tokens_seen_count_every_step_between_logged_ones():
    records = [
        {"step": 1, "loss": 3.0, "tokens": 100},
        {"step": 3, "loss": 2.0, "tokens": 120},  # log_every 2: steps 2 and 3 counted at 120 each
        {"step": 3, "val_loss": 2.5},
    ]
    train, val = curves(records)
    assert train == [(1, 100.0, 3.0), (3, 340.0, 2.0)]
    assert val == [(3, 340.0, 2.5)]


def test_labels_add_parent_folders_only_where_names_clash(tmp_path):
    paths = [tmp_path / "full" / "lr=1e-4", tmp_path / "lora" / "lr=1e-4", tmp_path / "lora" / "lr=3e-3"]
    assert labels_for(paths) == ["full/lr=1e-4", "lora/lr=1e-4", "lora/lr=3e-3"]
    assert labels_for(paths[1:]) == ["lr=1e-4", "lr=3e-3"]


def _row(name, **values):
    return {"run": name, "peak_mem_kind": "rss", "eval": None, **values}


def test_verdict_names_the_winner_and_the_gap_and_calls_small_gaps_ties():
    rows = [_row("a", best_val_loss=1.00), _row("b", best_val_loss=1.10), _row("c", best_val_loss=1.25)]
    assert verdict(rows) == ["a has the lowest best val_loss: 1.0000, 9.1% below the next best (b, 1.1000)."]
    tied = [_row("a", best_val_loss=1.00), _row("b", best_val_loss=1.015)]  # 1.5 % apart: noise
    assert verdict(tied)[0].startswith("a and b tie on best val_loss")


def test_verdict_on_speed_memory_and_eval_metrics():
    ev = {"data": "val", "n_examples": 40}
    rows = [
        _row("a", tokens_per_s=100.0, peak_mem_bytes=2e9, eval={**ev, "exact_match": 0.525}),
        _row("b", tokens_per_s=300.0, peak_mem_bytes=1e9, eval={**ev, "exact_match": 0.500}),
    ]
    said = verdict(rows)
    assert "a has the best exact_match: 52.5%, 2.5 points above b (50.0%; 40 examples; one example is 2.5%)." in said
    assert "b is fastest: 300 tokens/s, 3.00× the slowest (a, 100 tokens/s)." in said
    assert any(s.startswith("b needs the least memory: 1.0 GB vs 2.0 GB for a") for s in said)
    rows[1]["eval"]["data"] = "other.jsonl"
    assert "eval them on the same rows" in " ".join(verdict(rows))


def test_val_fingerprint_is_the_val_rows_not_their_path(tmp_path):
    rows = make_rows(8, seed=3)
    a, b = write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "b.jsonl", rows)
    other = write_jsonl(tmp_path / "c.jsonl", make_rows(8, seed=4))

    def fingerprint(val, **data):
        return val_fingerprint(DataSection(train=str(a), val=val, **data), seed=1)

    assert fingerprint(str(a)) == fingerprint(str(b)) != fingerprint(str(other))
    assert fingerprint(str(a)) != fingerprint(str(a), format="chat")  # the same rows read otherwise
    assert fingerprint(None) is None
    split = val_fingerprint(DataSection(train=str(a), val_fraction=0.25), seed=1)
    assert split == val_fingerprint(DataSection(train=str(b), val_fraction=0.25), seed=1)
    assert split != val_fingerprint(DataSection(train=str(a), val_fraction=0.25), seed=2)
    gone = DataSection(train=str(a), val=str(tmp_path / "gone.jsonl"))  # deleted while the run trained
    assert val_fingerprint_or_none(gone, seed=1) is None
