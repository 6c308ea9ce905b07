"""Time per optimizer step of SFT vs DPO (and DPO with precomputed reference) on the quickstart model.

Same model (builtin:tiny-llama + LoRA r16 on all linear layers), same batch_size (examples for SFT,
pairs for DPO), the quickstart data and its preference set, so the prompts and answers have the
same lengths. A DPO step runs the policy forward/backward on 2 × batch_size sequences, plus (reference
auto) a no-grad forward of the same sequences with the adapter disabled. Rounds are interleaved
(SFT, DPO, DPO-precompute, SFT, ...) so a change of machine load hits all three alike; the median of
the rounds is reported.

Usage (repository root): python scripts/bench_preference_step.py [--steps 5] [--rounds 3] [--batch-size 8]
Prints JSON: median wall and CPU seconds per step of each, and the DPO / SFT ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--batch-size", type=int, default=8, help="examples (SFT) or pairs (DPO) per step")
    args = parser.parse_args(argv)

    import torch
    from accelerate import Accelerator

    from ftkit.data import load_splits
    from ftkit.methods import get_method
    from ftkit.models.builtin import build_byte_tokenizer
    from ftkit.models.load import build_model
    from ftkit.recipe.methods import LoraConfig
    from ftkit.recipe.schema import DataSection, ModelSection, ObjectiveSection, TrainSection
    from ftkit.tasks.causal_lm import SFT
    from ftkit.tasks.preference import DisabledAdapter, Precomputed, PreferenceObjective
    from ftkit.tasks.preference.reference import attach, compute_reference_logps
    from ftkit.train.loop import TrainState, train_loop
    from ftkit.train.optim import build_optimizer

    tokenizer = build_byte_tokenizer()
    sft_data = load_splits(DataSection(train="data/quickstart/train.jsonl", max_length=256), tokenizer, 0).train
    pairs = load_splits(
        DataSection(train="data/preference/train.jsonl", format="preference", max_length=256), tokenizer, 0
    ).train
    base, _, _ = build_model(ModelSection(name="builtin:tiny-llama"), "cpu", seed=0)
    cfg = TrainSection(
        lr=1e-4, max_steps=args.steps, batch_size=args.batch_size, warmup_steps=0, scheduler="constant", log_every=1
    )
    objective_cfg = ObjectiveSection(name="dpo", beta=0.1)

    def timed(kind: str) -> float:
        torch.manual_seed(0)
        model = get_method("lora").apply(copy.deepcopy(base), LoraConfig(r=16, alpha=32, dropout=0.0))
        optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        examples, objective = sft_data, SFT()
        if kind == "dpo":
            examples, objective = pairs, PreferenceObjective(objective_cfg, DisabledAdapter(model))
        elif kind == "dpo_precompute":
            examples = copy.deepcopy(pairs[: args.steps * args.batch_size * 2])
            reference = DisabledAdapter(model)
            attach(examples, compute_reference_logps(reference, examples, args.batch_size, 0, torch.device("cpu")))
            objective = PreferenceObjective(objective_cfg, Precomputed())
        started, cpu_started = time.perf_counter(), time.process_time()
        train_loop(model, optimizer, examples, [], cfg, args.steps, TrainState(), Accelerator(cpu=True),
                   tokenizer.pad_token_id, objective=objective)  # fmt: skip
        return (time.perf_counter() - started) / args.steps, (time.process_time() - cpu_started) / args.steps

    kinds = ("sft", "dpo", "dpo_precompute")
    wall: dict[str, list[float]] = {kind: [] for kind in kinds}
    cpu: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            wall_s, cpu_s = timed(kind)
            wall[kind].append(wall_s)
            cpu[kind].append(cpu_s)
    median = {kind: statistics.median(values) for kind, values in wall.items()}
    median_cpu = {kind: statistics.median(values) for kind, values in cpu.items()}
    result = {
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "step_s": median,
        # CPU seconds of this process (all its threads): less sensitive than wall time to other
        # processes on a shared machine
        "step_cpu_s": median_cpu,
        "all_step_s": wall,
        "dpo_over_sft": median["dpo"] / median["sft"],
        "dpo_precompute_over_sft": median["dpo_precompute"] / median["sft"],
        "cpu_dpo_over_sft": median_cpu["dpo"] / median_cpu["sft"],
        "cpu_dpo_precompute_over_sft": median_cpu["dpo_precompute"] / median_cpu["sft"],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
