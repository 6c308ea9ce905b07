"""The after-training commands of docs/after-training.md and the README's main job run as written on a
(very short) quickstart run."""

from __future__ import annotations

import json
import shlex

import pytest

from tests.integration.test_readme import DOCS, README, blocks, short_val
from tests.support.helpers import run_cli


def commands_of(block: str) -> list[list[str]]:
    """A block's commands as argument lists, split as a shell would (a quoted prompt spans lines)."""
    words = shlex.split(block, comments=True)
    starts = [i for i, word in enumerate(words) if word == "ftkit"] + [len(words)]
    return [words[a + 1 : b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


def after_training_commands() -> list[list[str]]:
    """docs/after-training.md's block, then the README main job's commands on the run that it lacks."""
    page = DOCS / "after-training.md"
    commands = commands_of(next(b for b in blocks("", page) if b.startswith("ftkit eval runs/quickstart")))
    main_job = next(b for b in blocks("", README) if b.startswith("ftkit validate recipes/quickstart.yaml"))
    return commands + [c for c in commands_of(main_job) if c not in commands]


@pytest.mark.slow  # long (~50-90 s): a documented flow on the real model; run with -m slow
def test_after_training_commands_run(smollm2, tmp_path, monkeypatch):
    """On the real quickstart (SmolLM2), two steps, 8 val rows."""
    monkeypatch.chdir(README.parent)
    run = tmp_path / "quickstart"
    short = ["--set", "train.max_steps=2", "--set", "train.samples=0", "--set", f"data.val={short_val(tmp_path)}"]
    code, _, err = run_cli("train", "recipes/quickstart.yaml", *short, "--output-dir", str(run))
    assert code == 0, err
    ran = set()
    for command in after_training_commands():
        # validate and train are the setup above; merge --config and extract need runs the page only sketches
        if "runs/quickstart" not in command:
            continue
        args = [str(run) if a == "runs/quickstart" else a for a in command]
        args = [str(tmp_path / a) if a.startswith("merged/") else a for a in args]
        if args[0] == "eval":
            args += ["--max-samples", "4"]  # the command as written, on 4 of the 100 val rows
        if args[0] == "generate":
            args += ["--max-new-tokens", "16"]
        if args[0] == "export":
            args += ["--samples", "4"]
        code, out, err = run_cli(*args)
        assert code == 0, (args, err)
        ran.add(args[0])
    assert ran == {"eval", "generate", "merge", "export", "report"}
    assert json.loads((tmp_path / "merged" / "quickstart" / "merge_report.json").read_text())["merge"]["passed"]
    assert (tmp_path / "merged" / "quickstart.gguf").read_bytes()[:4] == b"GGUF"
