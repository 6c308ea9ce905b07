"""`ftkit generate`, `ftkit eval` and `ftkit merge` on a medusa run (method.name: medusa).

generate   greedy speculative decoding with the heads (ftkit.methods.medusa_decode): the text is the
           base's (+ LoRA's) greedy text, written in fewer forwards
eval       the usual loss / perplexity / token accuracy of the model, exact match of its generations, and
           `medusa`: each head's top-1 accuracy on the examples, mean tokens per verification forward,
           wall time of speculative decoding against transformers' `generate` and against a plain
           one-token-per-forward loop on the same prompts, and the share of outputs identical to
           `generate`'s
merge      base: lora: the LoRA merged as for any adapter, the heads written beside it in DIR/medusa/
           (config.json's base_model_name_or_path = DIR); base: frozen: nothing to merge
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, TextIO

import torch

from ftkit.data import collate, render_prompt
from ftkit.errors import ArgumentError, ModelError
from ftkit.methods.medusa import head_targets
from ftkit.methods.medusa_decode import (
    TREE,
    eos_ids,
    hf_greedy,
    load_medusa,
    medusa_generate,
    plain_generate,
)
from ftkit.models.target import Target
from ftkit.rundir import MEDUSA_CONFIG, MEDUSA_HEADS, MEDUSA_MERGED_DIR
from ftkit.tasks.causal_lm import GENERATION_SLACK_TOKENS, normalize, text_fields, token_scores
from ftkit.tasks.evaluation import EvalOptions, EvalSet, Evaluation
from ftkit.tasks.generation import build_prompt, encode_prompts
from ftkit.tasks.prediction import Inputs, PredictOptions, write_predictions


def predict(target: Target, tokenizer: Any, inputs: Inputs, options: PredictOptions, out: TextIO) -> list[str]:
    """`ftkit generate` on a medusa run: greedy completions through the heads, written like a causal LM's."""
    sampling = options.sampling
    if not sampling.greedy:
        raise ArgumentError(
            "--temperature: a medusa run decodes greedily with its heads (its output is the model's greedy "
            "output, written in fewer forwards); leave --temperature at 0"
        )
    prompts = [
        build_prompt(item, target.data_format, tokenizer, options.template, source=inputs.source(i))
        for i, item in enumerate(inputs.items)
    ]
    model = load_medusa(target, tokenizer)
    eos = eos_ids(model, tokenizer)
    completions = []
    for ids in encode_prompts(tokenizer, prompts):
        new, _ = medusa_generate(model, ids, sampling.max_new_tokens, eos)
        completions.append(tokenizer.decode(new, skip_special_tokens=True))
    if inputs.from_prompt:
        out.write(completions[0] + "\n")
        out.flush()
    else:
        lines = [completion.replace("\n", "\\n") for completion in completions]
        write_predictions(out, inputs, lines, [{"completion": completion} for completion in completions])
    return completions


@torch.no_grad()
def head_accuracy(model: Any, examples: list, pad_id: int, batch_size: int) -> list[float]:
    """Top-1 accuracy of each head on the trained tokens it predicts (head k: label t+k+2 from h_t)."""
    heads = model.medusa
    correct = [0] * heads.num_heads
    total = [0] * heads.num_heads
    device = next(model.hf.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
        for k, states, target in head_targets(hidden, batch["labels"], heads.num_heads):
            correct[k] += int((heads.logits(k, states).argmax(-1) == target).sum())
            total[k] += target.numel()
    return [c / max(t, 1) for c, t in zip(correct, total, strict=True)]


def evaluate(target: Target, tokenizer: Any, evalset: EvalSet, options: EvalOptions) -> Evaluation:
    """`ftkit eval` on a medusa run (module docstring)."""
    if options.baseline:
        raise ArgumentError(
            "--baseline: a medusa run's model is its base (+ LoRA); eval reports the heads' speed-up over plain "
            "greedy decoding of that same model instead; drop --baseline"
        )
    model = load_medusa(target, tokenizer)
    pad_id = tokenizer.pad_token_id
    tuned = token_scores(model, pad_id, evalset.examples, options.batch_size)
    accuracy = head_accuracy(model, evalset.examples, pad_id, options.batch_size)
    medusa: dict[str, Any] = {f"head{k}_top1": acc for k, acc in enumerate(accuracy)}
    records: list[dict] = []
    if options.generation:
        eos = eos_ids(model, tokenizer)
        pairs = [render_prompt(row, evalset.fmt, tokenizer) for row in evalset.rows]
        prompts = encode_prompts(tokenizer, [p for p, _ in pairs])
        budgets = [
            options.max_new_tokens or len(tokenizer(ref, add_special_tokens=False).input_ids) + GENERATION_SLACK_TOKENS
            for _, ref in pairs
        ]
        hf_greedy(model, prompts[0], 2, pad_id)  # warm-up: the first forward pays one-off costs
        times = {"medusa": 0.0, "generate": 0.0, "plain_loop": 0.0}
        accepted: list[int] = []
        identical = 0
        for (prompt, reference), ids, budget in zip(pairs, prompts, budgets, strict=True):
            reference_ids, seconds = hf_greedy(model, ids, budget, pad_id)
            times["generate"] += seconds
            plain, seconds = plain_generate(model, ids, budget, eos)
            times["plain_loop"] += seconds
            new, stats = medusa_generate(model, ids, budget, eos)
            times["medusa"] += stats.seconds
            accepted += stats.accepted
            same = new == reference_ids  # batch of one: generate's new tokens end at EOS, no padding
            identical += same
            text = tokenizer.decode(new, skip_special_tokens=True)
            records.append(
                {
                    "prompt": prompt,
                    "target": reference,
                    "generated": text,
                    "exact": text.strip() == reference.strip(),
                    "normalized": normalize(text) == normalize(reference),
                    "identical_to_generate": bool(same),
                    "plain_loop_identical": plain == new,
                    "tokens_per_forward": stats.tokens_per_forward,
                }
            )
        n = max(len(records), 1)
        tuned["exact_match"] = sum(r["exact"] for r in records) / n
        tuned["normalized_match"] = sum(r["normalized"] for r in records) / n
        medusa |= {
            "tokens_per_forward": sum(accepted) / max(len(accepted), 1),
            "speedup_vs_generate": times["generate"] / max(times["medusa"], 1e-9),
            "speedup_vs_plain_loop": times["plain_loop"] / max(times["medusa"], 1e-9),
            "identical_share": identical / n,
            "seconds": times,
            "prompts": len(records),
            "tree_nodes": len(TREE),
        }
    fields = text_fields(target, evalset, tuned, None, "medusa" if options.generation else None)
    return Evaluation(fields | {"medusa": medusa}, "generations", records)


def check_mergeable(target: Target) -> None:
    """base: frozen has no adapter: ModelError saying why there is nothing to merge."""
    if not target.is_adapter:
        raise ModelError(
            f"{target.spec}: nothing to merge: method medusa with base: frozen trained only the heads, the base "
            f"is unchanged, and the heads in {target.weights} ({MEDUSA_HEADS}) already stand alone beside "
            "that base (ftkit generate / eval use them as they are)"
        )


def write_heads(target: Target, out_dir: Path, base_name: str) -> None:
    """The run's heads and their config.json into out_dir, config's base_model_name_or_path = base_name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = Path(target.weights)
    shutil.copyfile(weights / MEDUSA_HEADS, out_dir / MEDUSA_HEADS)
    config = json.loads((weights / MEDUSA_CONFIG).read_text())
    config["base_model_name_or_path"] = base_name
    (out_dir / MEDUSA_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


__all__ = ["MEDUSA_MERGED_DIR", "check_mergeable", "evaluate", "predict", "write_heads"]
