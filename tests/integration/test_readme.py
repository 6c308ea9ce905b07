"""The README's examples work as written."""

from __future__ import annotations

from pathlib import Path

from tests.support.helpers import run_cli

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks(lang: str) -> list[str]:
    """Fenced code blocks of the README whose info string is `lang`."""
    found, current, info = [], None, ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == lang:
                    found.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return found


def short_val(tmp_path: Path, rows: int = 8) -> Path:
    """The first `rows` of the quickstart's val set: the README's commands on fewer rows (all 100 on the
    real model would dominate the suite's time)."""
    lines = (README.parent / "data" / "quickstart" / "val.jsonl").read_text().splitlines(keepends=True)
    path = tmp_path / "quickstart-val.jsonl"
    path.write_text("".join(lines[:rows]))
    return path


def test_bad_recipe_example_prints_what_readme_shows(tmp_path, monkeypatch):
    bad = next(b for b in blocks("yaml") if "lerning_rate" in b)
    shown = next(b for b in blocks("") if b.startswith("$ ftkit validate bad.yaml"))
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text(bad)
    code, out, err = run_cli("validate", "bad.yaml")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == shown.strip().splitlines()[1:]


def test_quickstart_commands_run(smollm2, tmp_path, monkeypatch):
    """`ftkit validate / train / report` on the shipped quickstart (the packaged SmolLM2; a few steps,
    8 val rows)."""
    root = README.parent
    monkeypatch.chdir(root)
    code, out, _ = run_cli("validate", "recipes/quickstart.yaml")
    assert code == 0 and "builtin:smollm2-135m" in out
    run_dir = tmp_path / "quickstart"
    code, out, err = run_cli(
        "train",
        "recipes/quickstart.yaml",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.samples=1",
        "--set",
        f"data.val={short_val(tmp_path)}",
        "--output-dir",
        str(run_dir),
    )
    assert code == 0, err
    assert out == ""
    (run_dir / "report.md").unlink()
    code, _, err = run_cli("report", str(run_dir))
    assert code == 0, err
    assert "## Diagnosis" in (run_dir / "report.md").read_text()
