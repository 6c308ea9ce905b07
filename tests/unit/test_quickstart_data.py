"""scripts/make_quickstart_data.py: deterministic, copyable, short, and the committed files match it."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_quickstart_data.py"
COMMITTED = ROOT / "data" / "quickstart"
FIELD = re.compile(r"(\w+)\[([^\]]*)\]")


def load_script():
    """The script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_quickstart_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = load_script()


def generate(out: Path, *args: str) -> tuple[bytes, bytes]:
    assert gen.main(["--out", str(out), *args]) == 0
    return (out / "train.jsonl").read_bytes(), (out / "val.jsonl").read_bytes()


def rows_of(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def fields(output: str) -> list[tuple[str, str]]:
    assert output.startswith("inform(") and output.endswith(")"), output
    return FIELD.findall(output)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    train, val = generate(tmp_path_factory.mktemp("small"), "--n-train", "300", "--n-val", "60")
    return rows_of(train), rows_of(val)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path):
    first = generate(tmp_path / "a", "--seed", "3", "--n-train", "50", "--n-val", "10")
    again = generate(tmp_path / "b", "--seed", "3", "--n-train", "50", "--n-val", "10")
    other = generate(tmp_path / "c", "--seed", "4", "--n-train", "50", "--n-val", "10")
    assert first == again
    assert first != other


def test_committed_files_are_the_default_output(tmp_path: Path):
    """The files in data/quickstart are what the script writes by default, so they can be regenerated."""
    train, val = generate(tmp_path)
    assert (COMMITTED / "train.jsonl").read_bytes() == train
    assert (COMMITTED / "val.jsonl").read_bytes() == val
    assert len(rows_of(train)) == 1000 and len(rows_of(val)) == 100


def test_every_output_value_appears_in_its_input(small):
    for row in small[0] + small[1]:
        for key, value in fields(row["output"]):
            values = value.split(", ") if key == "genres" else [value]
            for v in values:
                assert v and v in row["input"], f"{key}={v!r} not in {row['input']!r}"


def test_rows_are_alpaca_short_and_in_canonical_field_order(small):
    for row in small[0] + small[1]:
        assert set(row) == {"instruction", "input", "output"}
        assert row["instruction"] == gen.INSTRUCTION
        assert len(row["input"]) <= gen.MAX_INPUT_CHARS
        assert len(row["output"]) <= gen.MAX_OUTPUT_CHARS
        keys = [k for k, _ in fields(row["output"])]
        assert keys == [k for k in gen.FIELD_ORDER if k in keys]
        assert keys[:2] == ["name", "release_year"] and "genres" in keys
        assert 1985 <= int(dict(fields(row["output"]))["release_year"]) <= 2024


def test_val_names_are_unseen_word_combinations(small):
    """A val game's two-word stem never occurs in train, so the model must copy names, not recall them."""

    def stems(rows):
        return {" ".join(dict(fields(r["output"]))["name"].split()[:2]) for r in rows}

    train, val = small
    assert not stems(train) & stems(val)


def test_data_covers_the_variety_it_claims(small):
    train = small[0]
    outputs = [r["output"] for r in train]
    assert any("developer[" in o for o in outputs)
    assert any("platforms[" in o for o in outputs)
    genre_counts = {len(dict(fields(o))["genres"].split(", ")) for o in outputs}
    assert genre_counts == {1, 2, 3}
    used = {i for r in train for i, pattern in enumerate(template_patterns()) if pattern.fullmatch(r["input"])}
    assert used == set(range(len(gen.TEMPLATES))), "every sentence template is used"


def template_patterns() -> list[re.Pattern]:
    """Each template as a regex: its fixed words literal, each {placeholder} any text."""
    return [re.compile(".*?".join(re.escape(part) for part in re.split(r"\{\w+\}", t))) for t in gen.TEMPLATES]
