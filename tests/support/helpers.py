"""Shared test helpers: tiny data, recipes, and running the CLI in-process as a user would."""

from __future__ import annotations

import contextlib
import io
import json
import random
import sys
from pathlib import Path

import yaml

COLORS = ["red", "blue", "green", "black", "white", "amber", "teal", "violet"]
SHAPES = ["cube", "ring", "disc", "cone", "star", "arch"]


def make_rows(n: int, seed: int) -> list[dict]:
    """Alpaca rows of a tiny extraction task: the answer copies words from the input."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        color, shape, size = rng.choice(COLORS), rng.choice(SHAPES), rng.randint(1, 99)
        rows.append(
            {
                "instruction": "Extract.",
                "input": f"A {color} {shape} of size {size}.",
                "output": f"obj(color[{color}], shape[{shape}], size[{size}])",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_file(directory: Path, text: str, name: str = "recipe.yaml") -> Path:
    """`text` as `directory/name` (a recipe, by default); returns the path."""
    path = directory / name
    path.write_text(text)
    return path


def make_recipe(tmp: Path, data_dir: Path, name: str = "recipe", **sections: dict) -> Path:
    """Write a micro-llama recipe into `tmp`; keyword sections are merged over the defaults."""
    recipe = {
        "model": {"name": "builtin:micro-llama"},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(data_dir / "train.jsonl"), "val": str(data_dir / "val.jsonl"), "max_length": 128},
        "train": {
            "lr": 1e-2,
            "max_steps": 20,
            "batch_size": 8,
            "warmup_steps": 0,
            "scheduler": "constant",
            "samples": 1,
        },
        "output_dir": str(tmp / "runs" / name),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and key != "method":
            recipe[key] = {**recipe.get(key, {}), **value}
        else:
            recipe[key] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run `ftkit ARGS` in this process; return (exit code, stdout, stderr)."""
    from ftkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["ftkit", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if "loss" in r], [r for r in lines if "val_loss" in r]


def write_deep_micro_base(out_dir: Path, layers: int = 4, seed: int = 0) -> Path:
    """micro-llama with `layers` decoder layers (random init, byte tokenizer) as a model directory:
    enough layers for LoRA-drop to share one LoRA among several of them."""
    import torch
    from transformers import LlamaForCausalLM

    from ftkit.models.builtin import build_byte_tokenizer, builtin_config

    tokenizer = build_byte_tokenizer()
    config = builtin_config("builtin:micro-llama", tokenizer)
    config.num_hidden_layers = layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
