"""Generate the prompt rows of the quickstart task for GRPO (`data.format: prompt`).

Each row, for example:

    {"prompt": "Extract the attributes.\\n\\nShadow Realm is an action game, released in 2014.",
     "answer": "inform(name[Shadow Realm], release_year[2014], genres[action])"}

The prompt is exactly the user turn of the quickstart's alpaca rows (instruction + "\\n\\n" + input),
so a model fine-tuned with SFT on those rows (recipes/grpo-sft.yaml) sees the same text; the answer is
what the field_f1 and exact_match rewards compare with. Rows are taken from the quickstart files
(data/quickstart/, made by scripts/make_quickstart_data.py) in file order: train rows from after the
first `--skip` rows (those are the SFT stage's), val rows the quickstart's val rows (names never seen
in training). Deterministic: the same arguments give byte-identical files.

Usage: python scripts/make_grpo_data.py [--skip 48] [--n-train 400] [--n-val 40] [--out data/grpo]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "data" / "quickstart"


def prompt_row(row: dict) -> dict:
    """A quickstart alpaca row as a prompt row: the user turn as the prompt, the output as the answer."""
    text = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return {"prompt": text, "answer": row["output"]}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", type=int, default=48, help="quickstart train rows left to the SFT stage")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-val", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("data/grpo"))
    args = parser.parse_args()
    train = read(SOURCE / "train.jsonl")[args.skip : args.skip + args.n_train]
    val = read(SOURCE / "val.jsonl")[: args.n_val]
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / "train.jsonl", [prompt_row(r) for r in train])
    write(args.out / "val.jsonl", [prompt_row(r) for r in val])
    print(f"{len(train)} train / {len(val)} val prompt rows → {args.out}")


if __name__ == "__main__":
    main()
