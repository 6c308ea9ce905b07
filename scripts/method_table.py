"""Compare the methods: trainable parameters on the tiny model and on a Llama-3.1-8B shape, and the
loss each reaches on the quickstart task in the same number of steps.

    python scripts/method_table.py --steps 60                # every recipes/methods/*.yaml
    python scripts/method_table.py --steps 60 lora vera ia3  # some of them

Each method trains from its worked recipe (`ftkit train recipes/methods/NAME.yaml`) with
train.max_steps set to --steps, in its own process, one torch thread (OMP_NUM_THREADS=1:
on a shared CPU a second thread mostly spin-waits). The 8B-shaped count builds
Llama-3.1-8B's architecture on the meta device (no memory, no download) and applies the
method as the recipe says; a 4-bit base has the same trainable count as its 16-bit twin,
and PiSSA/OLoRA inits the same as LoRA's, so those are counted unquantized / with kaiming.
LoRA-drop's 8B count is LoRA's: its layer choice needs a scoring run on data, so every layer
keeps its own adapter there (the upper bound); its tiny-llama count is the trained one.
Prints a markdown table to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Llama-3.1-8B's shape (config.json of meta-llama/Llama-3.1-8B), written out: nothing is downloaded
LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)


def trainable_on_8b(recipe_path: Path, total_steps: int) -> int:
    """Trainable parameters of the recipe's method applied to a meta-device Llama-3.1-8B."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftkit.methods import RunInfo, get_method
    from ftkit.models.load import count_parameters
    from ftkit.recipe import load_recipe

    method = load_recipe(recipe_path).method
    if getattr(method, "init", "kaiming") != "kaiming":
        method = method.model_copy(update={"init": "kaiming"})  # same shapes; SVD/QR cannot run on meta tensors
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_31_8B))
        model = get_method(method.name).apply(model, method, RunInfo(total_steps=total_steps))
    return count_parameters(model)[0]


def train(name: str, steps: int, out_root: Path) -> dict:
    run_dir = out_root / name
    command = [
        sys.executable,
        "-m",
        "ftkit",
        "train",
        str(ROOT / "recipes" / "methods" / f"{name}.yaml"),
        "--output-dir",
        str(run_dir),
        "--overwrite",
        "--set",
        f"train.max_steps={steps}",
        "--set",
        f"train.eval_every={steps}",
        "--set",
        "train.samples=0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [json.loads(line).get("loss") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    return {
        "trainable": summary["facts"]["trainable_params"],
        "total": summary["facts"]["total_params"],
        "loss_last5": sum(losses[-5:]) / len(losses[-5:]),
        "val_loss": summary.get("final_val_loss"),
        "wall_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="methods (default: every recipes/methods/*.yaml)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per method (default 60)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "method-table", help="run directories")
    args = parser.parse_args(argv)
    names = args.names or sorted(p.stem for p in (ROOT / "recipes" / "methods").glob("*.yaml"))
    rows = []
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        result = train(name, args.steps, args.out)
        result["trainable_8b"] = trainable_on_8b(ROOT / "recipes" / "methods" / f"{name}.yaml", 1000)
        rows.append((name, result))
        print(f"{name}: {result}", file=sys.stderr, flush=True)
    print(
        f"| method | trainable (tiny-llama) | trainable (Llama-3.1-8B shape) | loss, last 5 of {args.steps} steps "
        "| val_loss | wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | {r['trainable_8b']:,} | | | |")
            continue
        pct = 100 * r["trainable"] / r["total"]
        val = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "-"
        print(
            f"| {name} | {r['trainable']:,} ({pct:.2f}%) | {r['trainable_8b']:,} | {r['loss_last5']:.3f} | {val} "
            f"| {r['wall_s']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
