"""Checkpoint save / load time for a recipe (default: the quickstart), on this machine.

    python scripts/bench_checkpoint.py [RECIPE] [--repeat 5]

Builds the recipe's model, method and optimizer as `ftkit train` does, takes one optimizer
step on random tokens so the optimizer state exists, then times (median of --repeat runs):
    save_s     save_checkpoint: weights, optimizer state, RNG, sha256 of every file, fsync, rename
    verify_s   verify_checkpoint: re-read and hash every file (done once per --resume)
    load_s     load_weights + optimizer.load_state_dict (the rest of what --resume loads)
Prints one JSON object on stdout; nothing is written outside a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/quickstart.yaml")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    from ftkit.methods import get_method
    from ftkit.models.load import build_model
    from ftkit.recipe import load_recipe
    from ftkit.tasks.causal_lm import SFT
    from ftkit.train.checkpoint import (
        checkpoint_bytes,
        load_optimizer_state,
        load_weights,
        save_checkpoint,
        verify_checkpoint,
    )
    from ftkit.train.loop import TrainState
    from ftkit.train.optim import build_optimizer

    recipe = load_recipe(args.recipe)
    with tempfile.TemporaryDirectory(prefix="ftkit-bench-") as tmp:
        run_dir = Path(tmp)
        model, tokenizer, _ = build_model(recipe.model, "cpu", recipe.train.seed, base_dir=run_dir / "base")
        model = get_method(recipe.method.name).apply(model, recipe.method)
        optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], recipe.train)
        ids = torch.randint(3, len(tokenizer) - 1, (2, 64), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        loss, _ = SFT().loss_sum(model, batch)
        loss.backward()
        optimizer.step()

        save, verify, load = [], [], []
        for step in range(1, args.repeat + 1):
            state = TrainState(step=step).to_dict()
            started = time.perf_counter()
            path = save_checkpoint(run_dir, model, tokenizer, optimizer, state)
            save.append(time.perf_counter() - started)
            started = time.perf_counter()
            verify_checkpoint(path)
            verify.append(time.perf_counter() - started)
            started = time.perf_counter()
            load_weights(model, path)
            optimizer.load_state_dict(load_optimizer_state(path))
            load.append(time.perf_counter() - started)
        result = {
            "recipe": args.recipe,
            "model": recipe.model.name,
            "method": recipe.method.name,
            "optimizer": recipe.train.optimizer,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "checkpoint_bytes": checkpoint_bytes(path),
            "repeat": args.repeat,
            "save_s": statistics.median(save),
            "verify_s": statistics.median(verify),
            "load_s": statistics.median(load),
        }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
