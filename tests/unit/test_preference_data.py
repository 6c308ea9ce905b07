"""scripts/make_preference_data.py: deterministic, one garbled field per pair, the quickstart's prompts,
and the committed files match it."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_preference_data.py"
COMMITTED = ROOT / "data" / "preference"
FIELD = re.compile(r"(\w+)\[([^\]]*)\]")


def load_script():
    sys.path.insert(0, str(SCRIPT.parent))  # it imports its sibling make_quickstart_data
    spec = importlib.util.spec_from_file_location("make_preference_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = load_script()


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def prompt(alpaca_row: dict) -> str:
    return f"{alpaca_row['instruction']}\n\n{alpaca_row['input']}"


def edit_distance_one(a: str, b: str) -> bool:
    """True when b is a with one character dropped, doubled, replaced, or two neighbours swapped."""
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]])
    short, long_ = sorted((a, b), key=len)
    return len(long_) == len(short) + 1 and any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))


def test_committed_files_are_the_generator_output(tmp_path):
    assert gen.main(["--out", str(tmp_path)]) == 0
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / name).read_bytes() == (COMMITTED / name).read_bytes(), name


def test_each_rejected_answer_has_exactly_one_garbled_field():
    for pair in rows(COMMITTED / "train.jsonl") + rows(COMMITTED / "val.jsonl"):
        chosen, rejected = FIELD.findall(pair["chosen"]), FIELD.findall(pair["rejected"])
        assert [k for k, _ in chosen] == [k for k, _ in rejected]  # same fields, same order
        changed = [(a, b) for (_, a), (_, b) in zip(chosen, rejected, strict=True) if a != b]
        assert len(changed) == 1, pair
        before, after = changed[0]
        if dict(chosen)["genres"] == before:  # a genre list: exactly one of its genres is garbled
            garbled = [(a, b) for a, b in zip(before.split(", "), after.split(", "), strict=True) if a != b]
            assert len(garbled) == 1 and edit_distance_one(*garbled[0]), pair
        else:
            assert edit_distance_one(before, after), pair


def test_val_prompts_are_the_quickstart_val_rows_and_train_prompts_are_new():
    quickstart_val = rows(ROOT / "data" / "quickstart" / "val.jsonl")
    quickstart_train = {prompt(r) for r in rows(ROOT / "data" / "quickstart" / "train.jsonl")}
    val = rows(COMMITTED / "val.jsonl")
    assert [p["prompt"] for p in val] == [prompt(r) for r in quickstart_val]
    assert [p["chosen"] for p in val] == [r["output"] for r in quickstart_val]
    train_prompts = {p["prompt"] for p in rows(COMMITTED / "train.jsonl")}
    assert len(train_prompts & quickstart_train) < 0.05 * len(train_prompts)  # fresh sentences, rare repeats


def test_garble_is_one_edit_and_deterministic():
    for seed in range(50):
        value = random.Random(seed).choice(["Silent Protocol", "2014", "action", "PC", "Nova Works"])
        out = gen.garble(random.Random(seed), value)
        assert out != value and edit_distance_one(value, out), (value, out)
        assert gen.garble(random.Random(seed), value) == out
