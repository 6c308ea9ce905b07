"""The layers of docs/architecture.md hold: `lint-imports` (the README's command) keeps the contract in
pyproject.toml, so no module imports from a layer above its own and no cycle crosses layers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_lint_imports_keeps_the_layers():
    lint = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(lint)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ftkit layers KEPT" in done.stdout
