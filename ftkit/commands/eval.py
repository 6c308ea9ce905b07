"""`ftkit eval`: measure a run, an adapter or a model on a dataset, optionally against its base.

Metrics, all over the same examples the training pipeline builds (same format, masks,
max_length; `ftkit.data.load_splits`), so `loss` on a run's own validation set equals
the last `val_loss` in its metrics.jsonl:

    loss            Σ_{trained tokens} −log p(x_t | x_<t) / (number of trained tokens)
                    (ftkit.train.loop.evaluate with the SFT objective: the training loss)
    perplexity      exp(loss)
    token_accuracy  share of trained tokens where argmax p(· | x_<t) = x_t (teacher forcing)
    exact_match     share of rows whose greedy completion equals the reference answer
                    (both stripped of surrounding whitespace)
    normalized_match  the same after lower-casing and collapsing every whitespace run to one space

On preference pairs (`data.format: preference`: a DPO/IPO/ORPO/SimPO run, or `--format
preference`) the metrics are the objective's own instead (`preference_scores`): loss,
rewards/chosen, rewards/rejected, rewards/accuracy, rewards/margin, logps/* — no generation.

Generation prompts are the rows rendered as in training up to the answer
(`ftkit.data.render_prompt`), decoded greedily in batches with left padding; each row
may generate its reference's length + 16 tokens (`--max-new-tokens` overrides), enough
to see a model that does not stop.

`--baseline` measures the base the same way: an adapter is switched off with peft's
`disable_adapter()` (same weights in memory, nothing reloaded), a full fine-tune's base
is loaded from the run. Results go to stdout as JSON with `--json`, else as a table on
stderr, and for a run to `eval-<data>-<time>.json` in the run directory (never overwritten).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ftkit.errors import ArgumentError, DataError, FtkitError
from ftkit.models.target import Target
from ftkit.tasks.causal_lm import SFTWithAccuracy

#: tokens each row may generate beyond its reference's length: room to show a model that does not stop
GENERATION_SLACK_TOKENS = 16


@dataclass
class EvalSet:
    """Tokenized examples, their raw rows (for generation), and where they came from."""

    examples: list[Any]
    rows: list[dict]
    fmt: str
    label: str  # what the data was, in words: "data/val.jsonl" or "the run's validation set (...)"
    stem: str  # short name for the eval file: the data file's stem, or "heldout"
    own_val: bool = False  # the run's own validation set (not --data)


def load_eval_set(
    target: Target, tokenizer: Any, data: str | None, fmt: str | None, max_samples: int | None
) -> EvalSet:
    """The run's validation examples, or every row of `data`; first `max_samples` only when given."""
    from ftkit.data import load_splits, read_rows
    from ftkit.recipe.schema import DataSection

    recipe = target.recipe
    fmt = fmt or (recipe.data.format if recipe else None) or "alpaca"
    if data is not None:
        from ftkit.data.splits import check_data_file

        check_data_file("--data", data)  # named as --data, not as the data.train of the section below
        section = DataSection(
            train=data,
            format=fmt,
            max_length=recipe.data.max_length if recipe else 1024,
            train_on_prompt=recipe.data.train_on_prompt if recipe else False,
            max_samples=max_samples,
        )
        examples = load_splits(section, tokenizer, seed=0).train
        label, stem, source_file = data, Path(data).stem, data
    else:
        if recipe is None:
            raise ArgumentError(f"{target.spec} is not a run, so it has no validation set; pass --data FILE")
        if recipe.data.format != fmt:
            recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"format": fmt})})
        examples = load_splits(recipe.data, tokenizer, recipe.train.seed).val[:max_samples]
        if not examples:
            raise DataError(f"{target.run_dir}: the run has no validation set (data.val / val_fraction); pass --data")
        source_file = recipe.data.val or recipe.data.train
        kind = f"data.val {recipe.data.val}" if recipe.data.val else f"data.val_fraction of {recipe.data.train}"
        label = f"the run's validation set ({kind})"
        stem = Path(recipe.data.val).stem if recipe.data.val else "heldout"
    by_source = {source: row for row, source in read_rows(source_file)}
    return EvalSet(examples, [by_source[ex.source] for ex in examples], fmt, label, stem, own_val=data is None)


def normalize(text: str) -> str:
    """Lower-case, every whitespace run → one space, stripped."""
    return " ".join(text.split()).casefold()


def token_scores(model: Any, tokenizer: Any, evalset: EvalSet, batch_size: int) -> dict[str, float]:
    """loss, perplexity and token_accuracy of one model on `evalset` (teacher forcing)."""
    from ftkit.tasks.objective import evaluate

    device = next(model.parameters()).device
    scores = evaluate(model, evalset.examples, batch_size, tokenizer.pad_token_id, device, SFTWithAccuracy())
    return {
        "loss": scores["loss"],
        "perplexity": math.exp(min(scores["loss"], 50.0)),
        "token_accuracy": scores["token_accuracy"],
    }


def generation_scores(
    generate: Any, tokenizer: Any, evalset: EvalSet, max_new_tokens: int | None
) -> tuple[dict[str, float], list[dict]]:
    """(exact_match / normalized_match, one record per row) from `generate(prompts, budgets) -> texts`."""
    from ftkit.data import render_prompt

    pairs = [render_prompt(row, evalset.fmt, tokenizer) for row in evalset.rows]
    budgets = [
        max_new_tokens or len(tokenizer(ref, add_special_tokens=False).input_ids) + GENERATION_SLACK_TOKENS
        for _, ref in pairs
    ]
    texts = generate([p for p, _ in pairs], budgets)
    records = [
        {
            "prompt": prompt,
            "target": reference,
            "generated": text,
            "exact": text.strip() == reference.strip(),
            "normalized": normalize(text) == normalize(reference),
        }
        for (prompt, reference), text in zip(pairs, texts, strict=True)
    ]
    n = max(len(records), 1)
    metrics = {
        "exact_match": sum(r["exact"] for r in records) / n,
        "normalized_match": sum(r["normalized"] for r in records) / n,
    }
    return metrics, records


def run_eval(
    target: Target,
    data: str | None = None,
    fmt: str | None = None,
    baseline: bool = False,
    max_samples: int | None = None,
    batch_size: int | None = None,
    generation: bool = True,
    max_new_tokens: int | None = None,
    save: bool = True,
) -> dict:
    """Evaluate `target` (and its base with `baseline`); return the result and write it for a run.

    Token scores come first, from the transformers model; with vLLM that model is freed
    before the engine takes the GPU, so the two never hold the weights at once.
    """
    import gc

    import torch

    if target.task == "classification":  # a classifier writes no text: loss, accuracy, confusion matrix
        from ftkit.commands.classify import run_classification_eval

        if fmt is not None:
            raise ArgumentError(f"--format: {target.spec} is a classifier, which reads rows of text and label; drop it")
        return run_classification_eval(target, data, baseline, max_samples, batch_size, save)
    from ftkit.commands.generate import Sampling, VllmGenerator, generate_texts, vllm_can_serve, vllm_usable
    from ftkit.models.target import load_model, load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(target)
    evalset = load_eval_set(target, tokenizer, data, fmt, max_samples)
    batch_size = batch_size or (target.recipe.train.batch_size if target.recipe else 8)
    backend = "vllm" if generation and vllm_usable() and vllm_can_serve(target) is None else "transformers"
    greedy = Sampling(temperature=0.0)

    def hf_generate(model: Any) -> Any:
        return lambda prompts, budgets: generate_texts(model, tokenizer, prompts, greedy, batch_size, budgets)

    def base_scope(model: Any) -> Any:
        """A context in which `model` is the base: the adapter switched off (full fine-tunes: not used)."""
        return model.disable_adapter() if target.is_adapter else contextlib.nullcontext()

    if evalset.fmt == "preference":
        tuned, base = preference_scores(target, tokenizer, evalset, batch_size, baseline)
        return _finish(target, evalset, tuned, base, None, [], [], batch_size, started, save)
    model = load_model(target, tokenizer)
    tuned = token_scores(model, tokenizer, evalset, batch_size)
    base = None
    if baseline and target.is_adapter:
        with base_scope(model):
            base = token_scores(model, tokenizer, evalset, batch_size)
    tuned_records: list[dict] = []
    base_records: list[dict] = []
    if generation and backend == "transformers":
        metrics, tuned_records = generation_scores(hf_generate(model), tokenizer, evalset, max_new_tokens)
        tuned |= metrics
        if base is not None:
            with base_scope(model):
                metrics, base_records = generation_scores(hf_generate(model), tokenizer, evalset, max_new_tokens)
            base |= metrics
    elif generation:
        del model
        model = None
        gc.collect()
        torch.cuda.empty_cache()
        engine = VllmGenerator(target, tokenizer)
        metrics, tuned_records = generation_scores(
            lambda prompts, budgets: engine.generate(prompts, greedy, budgets), tokenizer, evalset, max_new_tokens
        )
        tuned |= metrics
        if base is not None:  # an adapter's base: the same engine without the LoRA request
            metrics, base_records = generation_scores(
                lambda prompts, budgets: engine.generate(prompts, greedy, budgets, use_adapter=False),
                tokenizer,
                evalset,
                max_new_tokens,
            )
            base |= metrics
        del engine
    if baseline and not target.is_adapter:  # a full fine-tune's base is another model
        del model
        gc.collect()
        model = load_model(target, tokenizer, base_only=True)
        base = token_scores(model, tokenizer, evalset, batch_size)
        if generation:
            metrics, base_records = generation_scores(hf_generate(model), tokenizer, evalset, max_new_tokens)
            base |= metrics
    return _finish(
        target,
        evalset,
        tuned,
        base,
        backend if generation else None,
        tuned_records,
        base_records,
        batch_size,
        started,
        save,
    )


def preference_scores(
    target: Target, tokenizer: Any, evalset: EvalSet, batch_size: int, baseline: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(tuned, base or None) preference metrics on chosen/rejected pairs: the loss of the run's
    objective (dpo with beta 0.1 when the target is no preference run), implicit rewards,
    reward accuracy and margin, and the reference-free `logps/accuracy`.

    The reference is the one the run trained against: its precomputed log-probs when it
    stored them and this is its validation set; otherwise an adapter's base (the adapter
    switched off, no second copy) or, for a full fine-tune, its base model loaded beside it.
    `baseline` scores that reference as the policy: its rewards are 0 by definition, and its
    `logps/accuracy` says how often it already ranked the chosen answer first.
    """
    import torch

    from ftkit.models.target import device_type, load_model
    from ftkit.recipe.schema import PREFERENCE_OBJECTIVES, ObjectiveSection
    from ftkit.tasks.preference import evaluate_preferences, load_reference_logps
    from ftkit.tasks.preference.reference import REFERENCE_FILE

    recipe = target.recipe
    if recipe is not None and recipe.objective.name in PREFERENCE_OBJECTIVES:
        objective = recipe.objective
    else:
        objective = ObjectiveSection(name="dpo")
        print(
            f"note: {target.spec} was not trained with a preference objective; scoring dpo with beta {objective.beta}",
            file=sys.stderr,
        )
    pairs = evalset.examples
    stored = target.run_dir is not None and (target.run_dir / REFERENCE_FILE).is_file()
    if objective.needs_reference and stored and evalset.own_val:
        load_reference_logps(target.run_dir, "val", pairs)
    model = load_model(target, tokenizer)
    device = torch.device(device_type())
    reference_model = None
    if objective.needs_reference and not target.is_adapter and not all(p.ref_logps is not None for p in pairs):
        reference_model = load_model(target, tokenizer, base_only=True)

    def score(policy: Any, reference: Any) -> dict[str, Any]:
        result = evaluate_preferences(
            policy,
            pairs,
            objective,
            pad_id=tokenizer.pad_token_id,
            batch_size=batch_size,
            device=device,
            reference_model=reference,
        )
        return {key: value for key, value in result.items() if key != "pairs"}

    tuned = score(model, reference_model)
    base = None
    if baseline:  # the reference as the policy (its own reference, unless the pairs carry precomputed ones)
        if target.is_adapter:
            with model.disable_adapter():
                base = score(model, model)
        else:
            loaded = reference_model is not None
            base_model = reference_model if loaded else load_model(target, tokenizer, base_only=True)
            base = score(base_model, base_model)
    return tuned, base


def _finish(
    target: Target,
    evalset: EvalSet,
    tuned: dict[str, Any],
    base: dict[str, Any] | None,
    backend: str | None,
    tuned_records: list[dict],
    base_records: list[dict],
    batch_size: int,
    started: float,
    save: bool,
) -> dict:
    """The result record (printed, and written to the run dir for a run)."""
    import torch

    from ftkit.models.target import device_type

    result: dict[str, Any] = {
        "target": target.spec,
        "weights": target.weights,
        "checkpoint": target.checkpoint,
        "data": evalset.label,
        "format": evalset.fmt,
        "n_examples": len(evalset.examples),
        "target_tokens": sum(_target_tokens(ex) for ex in evalset.examples),
        "generation_backend": backend,
        "tuned": tuned,
    }
    if base is not None:
        result["base"] = base
        result["base_model"] = target.base
        result["delta"] = {key: tuned[key] - base[key] for key in tuned}
        for row, base_row in zip(tuned_records, base_records, strict=True):
            row["base_generated"] = base_row["generated"]
    result |= {
        "batch_size": batch_size,
        "device": device_type() + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        "wall_s": time.perf_counter() - started,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "generations": tuned_records,
    }
    if save and target.run_dir is not None:
        result["file"] = str(write_eval_file(target.run_dir, result, evalset.stem, target.checkpoint))
        _refresh_report(target.run_dir)
    return result


def _target_tokens(example: Any) -> int:
    """Trained tokens of an example, or of both sides of a preference pair."""
    sides = (example.chosen, example.rejected) if hasattr(example, "chosen") else (example,)
    return sum(sum(label != -100 for label in side.labels[1:]) for side in sides)


def write_eval_file(run_dir: Path, result: dict, stem: str, checkpoint: str | None) -> Path:
    """`eval-<data>[-<checkpoint>]-<UTC time>.json` in the run dir, created exclusively: never overwrites."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = "-".join(
        part for part in ("eval", stem, None if checkpoint in (None, "final") else checkpoint, stamp) if part
    )
    for attempt in range(1, 1000):
        path = run_dir / (f"{name}.json" if attempt == 1 else f"{name}-{attempt}.json")
        try:
            with path.open("x", encoding="utf-8") as out:
                out.write(json.dumps(result | {"file": str(path)}, indent=2, allow_nan=True) + "\n")
            return path
        except FileExistsError:
            continue
    raise FtkitError(f"{run_dir}: cannot find a free name for {name}.json")


def _refresh_report(run_dir: Path) -> None:
    """Rewrite report.md so it shows this eval; a run without metrics (or a broken one) keeps its report."""
    from ftkit.report import write_report

    if (run_dir / "summary.json").is_file():
        with contextlib.suppress(FtkitError):
            write_report(run_dir)


_ROWS = (
    ("loss", "{:.4f}"),
    ("perplexity", "{:.2f}"),
    ("token_accuracy", "{:.1%}"),
    ("accuracy", "{:.1%}"),
    ("exact_match", "{:.1%}"),
    ("normalized_match", "{:.1%}"),
    ("rewards/accuracy", "{:.1%}"),
    ("rewards/margin", "{:.3f}"),
    ("rewards/chosen", "{:.3f}"),
    ("rewards/rejected", "{:.3f}"),
    ("logps/accuracy", "{:.1%}"),
    ("logps/chosen", "{:.2f}"),
    ("logps/rejected", "{:.2f}"),
    ("nll/chosen", "{:.4f}"),
)


def format_table(result: dict) -> str:
    """The human summary printed on stderr: one row per metric, base and delta when measured."""
    has_base = "base" in result
    header = ["metric", "base", "tuned", "delta"] if has_base else ["metric", "value"]
    rows = [header]
    for key, spec in _ROWS:
        if key not in result["tuned"]:
            continue
        tuned = spec.format(result["tuned"][key])
        if has_base:
            delta = result["delta"][key]
            delta_text = f"{delta * 100:+.1f} pt" if "%" in spec else f"{delta:+.4f}"
            rows.append([key, spec.format(result["base"][key]), tuned, delta_text])
        else:
            rows.append([key, tuned])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    head = (
        f"{result['target']} ({result['checkpoint'] or 'model'}) on {result['data']}: {result['n_examples']} examples"
    )
    foot = f"{result['wall_s']:.1f}s on {result['device']}" + (f" · wrote {result['file']}" if "file" in result else "")
    if "confusion" in result:  # a classifier's result
        from ftkit.commands.classify import confusion_table

        lines.append(confusion_table(result).rstrip("\n"))
    return "\n".join([head, *lines, foot]) + "\n"


def print_result(result: dict, as_json: bool) -> None:
    from ftkit import io as stdout

    if as_json:
        stdout.data().write(json.dumps(result, indent=2, allow_nan=True) + "\n")
    else:
        sys.stderr.write(format_table(result))
