"""The CLI as a separate process: `python -m ftkit validate`, and importing the CLI and recipe without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ftkit.methods import REGISTRY
from tests.support.helpers import write_file

ROOT = Path(__file__).resolve().parents[2]
METHOD_NAMES = ", ".join(REGISTRY)  # registration order: full, freeze, lora, qlora, ...


def test_cli_as_a_subprocess(tmp_path):
    path = write_file(tmp_path, "method: {name: lroa}\ndata: {train: d.jsonl}\n")
    done = subprocess.run(
        [sys.executable, "-m", "ftkit", "validate", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 2 and done.stdout == ""
    assert (
        done.stderr == f"error: {path}:1: method.name: unknown method 'lroa' (did you mean lora?); "
        f"known: {METHOD_NAMES}\n"
    )


def test_recipe_and_cli_do_not_import_torch():
    code = (
        "import sys, ftkit.cli, ftkit.recipe\n"
        "ftkit.recipe.dump_recipe(ftkit.recipe.parse_recipe('method: {name: lora}\\ndata: {train: d}\\n'))\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
