"""Generate the mixture-of-experts example data from the quickstart set (docs/moe.md).

    data/describe/{train,val}.jsonl   the quickstart task reversed: inform(...) → a sentence
                                      ("Describe the game in one sentence."), row for row
    data/moe/{train,val}.jsonl        both tasks mixed for router training, each row with a
                                      `domain` column (extract | describe) that the routing
                                      report groups the val rows by

Contract: deterministic (no randomness: rows are taken in file order and alternate between the
two tasks); describe row i is quickstart row i with input and output swapped; the mixed set takes
the first --n-mix-train rows of each task's train split (the experts' training rows) and the first
--n-mix-val rows of each val split.

Usage: python scripts/make_moe_data.py [--source data/quickstart] [--n-mix-train 200] [--n-mix-val 50]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DESCRIBE = "Describe the game in one sentence."


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def describe_rows(rows: list[dict]) -> list[dict]:
    """The reverse task: the meaning representation in, the sentence out."""
    return [{"instruction": DESCRIBE, "input": r["output"], "output": r["input"]} for r in rows]


def mixed(extract: list[dict], describe: list[dict], n: int) -> list[dict]:
    """The first n rows of each task, alternating, each tagged with its domain."""
    out = []
    for a, b in zip(extract[:n], describe[:n], strict=True):
        out += [{**a, "domain": "extract"}, {**b, "domain": "describe"}]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("data/quickstart"))
    parser.add_argument("--describe-out", type=Path, default=Path("data/describe"))
    parser.add_argument("--mix-out", type=Path, default=Path("data/moe"))
    parser.add_argument("--n-mix-train", type=int, default=200)
    parser.add_argument("--n-mix-val", type=int, default=50)
    args = parser.parse_args()
    for split, n in (("train", args.n_mix_train), ("val", args.n_mix_val)):
        extract = read(args.source / f"{split}.jsonl")
        describe = describe_rows(extract)
        write(args.describe_out / f"{split}.jsonl", describe)
        write(args.mix_out / f"{split}.jsonl", mixed(extract, describe, n))


if __name__ == "__main__":
    main()
