"""Tokens/s and peak memory of one training step at a long length: LoRA vs LongLoRA (S²-Attn).

Each variant runs in its own process (peak RSS is per process) on builtin:tiny-llama (6 heads,
2 KV heads, max_position_embeddings 4096) with random token rows of --length tokens:
    lora             LoRA r16 on q/k/v/o, full attention (sdpa)
    longlora         the same adapters + trained embeddings and norms, S²-Attn with G = length / 4
    longlora_full    LongLoRA's trained modules with full attention: what S²-Attn alone changes
A step is ftkit's SFT loss (chunked cross-entropy), backward and AdamW, in fp32 on one thread
by default. The first step is a warm-up and not timed; the median of the others is reported.

Usage (repository root): python -m scripts.bench_longlora [--length 2048] [--steps 4] [--threads 1]
Prints JSON: per variant tokens/s (wall and CPU time) and peak RSS; and the longlora / lora ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

VARIANTS = ("lora", "longlora", "longlora_full")


def one(variant: str, length: int, steps: int, batch_size: int, threads: int) -> dict:
    """Train `steps` steps of `variant` in this process; its timings and peak RSS."""
    import resource

    import torch

    from ftkit.methods import RunInfo, get_method
    from ftkit.models.load import build_model
    from ftkit.recipe.methods import LongloraConfig, LoraConfig
    from ftkit.recipe.schema import ModelSection
    from ftkit.tasks.causal_lm import SFT

    torch.set_num_threads(threads)
    model, _, _ = build_model(ModelSection(name="builtin:tiny-llama"), "cpu", seed=0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if variant == "lora":
        config = LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=targets)
    else:
        config = LongloraConfig(r=16, alpha=32, dropout=0.0, target_modules=targets)
    method = get_method(config.name)
    model = method.apply(model, config, RunInfo())
    if variant == "longlora":
        method.hooks(model, config, RunInfo(max_length=length))  # switches attention to S²-Attn, G = length / 4
    attention = model.get_base_model().config._attn_implementation
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 259, (batch_size, length), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    objective = SFT()
    model.train()
    walls, cpus = [], []
    for _ in range(steps + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        loss, _ = objective.loss_sum(model, batch)
        (loss / objective.units(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    tokens = batch_size * length
    wall_s, cpu_s = statistics.median(walls[1:]), statistics.median(cpus[1:])
    return {
        "variant": variant,
        "attention": attention,
        "length": length,
        "batch_size": batch_size,
        "step_wall_s": wall_s,
        "step_cpu_s": cpu_s,
        "tokens_per_s": tokens / wall_s,
        "tokens_per_cpu_s": tokens / cpu_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048, help="tokens per row")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per step")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (internal)")
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(one(args.variant, args.length, args.steps, args.batch_size, args.threads)))
        return 0
    results = {}
    for variant in VARIANTS:
        command = [sys.executable, "-m", "scripts.bench_longlora", "--variant", variant]
        command += ["--length", str(args.length), "--steps", str(args.steps)]
        command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    lora, longlora = results["lora"], results["longlora"]
    results["longlora_over_lora"] = {
        "tokens_per_cpu_s": longlora["tokens_per_cpu_s"] / lora["tokens_per_cpu_s"],
        "tokens_per_s": longlora["tokens_per_s"] / lora["tokens_per_s"],
        "peak_rss": longlora["peak_rss_bytes"] / lora["peak_rss_bytes"],
    }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
