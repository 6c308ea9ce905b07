"""`ftkit generate`: greedy and seeded sampling are reproducible, batches equal one-by-one,
and JSONL rows come back as the same rows with a completion."""

from __future__ import annotations

import io
import json

from tests.support.helpers import make_rows, run_cli


def generate(monkeypatch, run, *args: str, stdin: str | None = None) -> str:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code, out, err = run_cli("generate", str(run), *args)
    assert code == 0, err
    return out


def test_sampling_is_deterministic_with_a_seed(trained_runs, monkeypatch):
    run = trained_runs["full"]
    sample = ("--prompt", "Extract.\n\nA red cube of size 7.", "--temperature", "1.0", "--max-new-tokens", "40")
    first = generate(monkeypatch, run, *sample, "--seed", "3")
    again = generate(monkeypatch, run, *sample, "--seed", "3")
    other = generate(monkeypatch, run, *sample, "--seed", "4")
    assert first == again
    # 40 tokens drawn at temperature 1 from a barely trained model: two seeds agreeing is ~impossible
    assert first != other


def test_jsonl_round_trip_keeps_rows_and_order(trained_runs, monkeypatch):
    run = trained_runs["lora"]
    rows = [{k: r[k] for k in ("instruction", "input")} | {"id": i} for i, r in enumerate(make_rows(5, seed=9))]
    rows.append({"prompt": "Extract.\n\nA blue ring of size 3.", "id": 5})
    stdin = "".join(json.dumps(r) + "\n" for r in rows)
    out = generate(monkeypatch, run, "--max-new-tokens", "24", "--batch-size", "4", stdin=stdin)
    back = [json.loads(line) for line in out.splitlines()]
    assert [{k: v for k, v in r.items() if k != "completion"} for r in back] == rows
    assert all(isinstance(r["completion"], str) for r in back)
    # a batch of left-padded prompts decodes greedily exactly as each prompt alone
    alone = generate(monkeypatch, run, "--prompt", rows[5]["prompt"], "--max-new-tokens", "24")
    assert alone == back[5]["completion"] + "\n"


def test_plain_lines_in_one_completion_per_line_out(trained_runs, monkeypatch):
    out = generate(monkeypatch, trained_runs["full"], "--max-new-tokens", "8", stdin="Extract.\n\nExtract. Now.\n")
    assert len(out.splitlines()) == 2


def test_no_prompt_is_an_error(trained_runs, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, out, err = run_cli("generate", str(trained_runs["full"]))
    assert code == 2 and out == "" and "--prompt" in err
