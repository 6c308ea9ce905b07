"""What a person sees on stderr, with the CLI as its own process: plain lines when stderr is a file
(`nohup ftkit train … > train.log 2>&1`), the rich bar on a terminal, and ftkit's lines only; the
libraries' warnings and prints land in RUN/logs/libraries.log."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_readme import short_val
from tests.support.helpers import make_recipe

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"(?:[\d.,e+-]+|nan|none)"

#: every line ftkit itself writes during a run that completes
FTKIT_LINES = [
    r"\S+ · \S+ · trainable [\d,]+ of [\d,]+ params \([\d.]+%\) · \d+ train / \d+ val examples · \d+ steps · \w+",
    rf"step \d+/\d+ · epoch {NUMBER} · loss {NUMBER} · lr {NUMBER} · grad_norm {NUMBER} · {NUMBER} tok/s"
    r" · elapsed \w+( · eta \w+)?",
    rf"eval at step \d+/\d+ · val_loss {NUMBER}( · val_\w+ {NUMBER})*",
    rf"done in \w+ · loss {NUMBER} · val_loss {NUMBER} · .+",
]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow  # long (~50-90 s): a documented flow on the real model; run with -m slow
def test_quickstart_stderr_holds_ftkit_lines_only(smollm2, tmp_path):
    """The shipped quickstart (the real SmolLM2, converted once by the fixture), 6 steps, 8 val rows."""
    run = tmp_path / "quickstart"
    args = ["--output-dir", str(run), "--set", "train.max_steps=6", "--set", "data.max_samples=96"]
    args += ["--set", f"data.val={short_val(tmp_path)}"]
    args += ["--set", "train.eval_every=3", "--set", "train.samples=0"]
    done = subprocess.run(
        [sys.executable, "-m", "ftkit", "train", "recipes/quickstart.yaml", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    strays = [line for line in lines if not any(re.fullmatch(pattern, line) for pattern in FTKIT_LINES)]
    assert not strays, strays
    assert lines[1].startswith("step 1/6 · ")  # the first step's line comes at once
    assert lines[-2].startswith("eval at step 6/6 · val_loss ")
    assert sum(line.startswith("eval at") for line in lines) == 2
    assert (run / "logs" / "libraries.log").is_file()


def test_on_a_terminal_the_rich_bar_draws_and_no_plain_lines(tmp_path, tiny_data):
    recipe = make_recipe(tmp_path, tiny_data, train={"max_steps": 3, "samples": 0})
    main, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "ftkit", "train", str(recipe)],
        stdout=subprocess.PIPE,
        stderr=secondary,
        cwd=ROOT,
        env={**_env(), "TERM": "xterm", "COLUMNS": "120"},
    )
    os.close(secondary)
    shown = b""
    while True:
        ready, _, _ = select.select([main], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal's other end closed: the process ended
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    assert process.wait(timeout=60) == 0, shown.decode(errors="replace")
    text = shown.decode(errors="replace")
    assert "3/3" in text and "━" in text  # rich's bar: M/N and the bar glyphs
    assert "step 1/3 ·" not in text
    assert "done in" in text
