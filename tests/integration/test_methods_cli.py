"""`ftkit methods` in process: the list, one method's keys, a peft type's keys, unknown names, the README commands."""

from __future__ import annotations

import re
from pathlib import Path

from ftkit.methods import REGISTRY
from ftkit.recipe import load_recipe
from ftkit.recipe.describe import yaml_scalar
from tests.support.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]


def test_methods_lists_every_method_with_its_summary_on_stdout():
    code, out, err = run_cli("methods")
    assert (code, err) == (0, "")
    for name, entry in REGISTRY.items():
        assert re.search(rf"^{name}\s+{re.escape(entry.config.summary)}$", out, re.MULTILINE), name


def test_methods_name_prints_keys_types_defaults_and_descriptions():
    code, out, err = run_cli("methods", "vera")
    assert (code, err) == (0, "")
    assert out.startswith("vera: " + REGISTRY["vera"].config.summary)
    rows = {
        line.split()[0]: line
        for line in out.splitlines()
        if line and line.split()[0] in REGISTRY["vera"].config.model_fields
    }
    for key, info in REGISTRY["vera"].config.model_fields.items():
        assert key in rows, key
        if key != "name":
            assert yaml_scalar(info.get_default(call_default_factory=True)) in rows[key]
            assert info.description in rows[key]
    assert "integer >= 1" in rows["r"] and "default train.lr: 0.001" in out


def test_methods_peft_type_prints_peft_s_own_fields_and_help():
    code, out, err = run_cli("methods", "peft", "fourierft")
    assert (code, err) == (0, "")
    row = next(line for line in out.splitlines() if line.startswith("n_frequency "))
    assert "integer" in row and "1000" in row and "Num of learnable frequencies" in row
    assert "task_type" not in out and "peft_type" not in out  # ftkit fills those


def test_methods_unknown_name_exits_2_with_a_suggestion():
    code, out, err = run_cli("methods", "verra")
    assert code == 2 and out == ""
    assert err.startswith("error: methods: unknown method 'verra' (did you mean vera?); known: full, freeze")


def test_readme_method_commands_run(tmp_path):
    """docs/methods.md's method commands: listing, describing, and the worked VeRA recipe training
    (one step, no validation set, so it stays a smoke test of the recipe as shipped)."""
    page = (ROOT / "docs" / "methods.md").read_text()
    for command in ("ftkit methods ", "ftkit methods vera", "ftkit train recipes/methods/vera.yaml",
                    "ftkit train recipes/quickstart.yaml --set method.name=dora"):  # fmt: skip
        assert command in page
    assert run_cli("methods")[0] == 0 and run_cli("methods", "vera")[0] == 0
    overrides = ["train.max_steps=1", "train.samples=0", "data.val=null", "data.max_samples=4", "data.max_length=160"]
    args = [a for o in overrides for a in ("--set", o)]
    code, out, err = run_cli(
        "train", str(ROOT / "recipes/methods/vera.yaml"), *args, "--output-dir", str(tmp_path / "v")
    )
    assert (code, out) == (0, ""), err
    assert (tmp_path / "v" / "final" / "adapter_config.json").is_file()
    lora = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    dora = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["method.name=dora"])
    assert dora.method.name == "dora"
    assert (dora.method.r, dora.method.alpha) == (lora.method.r, lora.method.alpha)  # the LoRA keys carry over
