"""The causal language-model task (`task: causal_lm`, objective sft): next-token cross-entropy.

    SFT                         the objective (chunked over the vocabulary)
    CausalLMTask.evaluate       `ftkit eval`: token scores and, from generations, exact match
    CausalLMTask.predict        `ftkit generate`: completions (ftkit.tasks.generation)

`ftkit eval` metrics, over the examples the training pipeline builds, so `loss` on a run's own
validation set equals the last `val_loss` in its metrics.jsonl:

    loss            Σ_{trained tokens} −log p(x_t | x_<t) / (number of trained tokens)
                    (`evaluate` with the SFT objective: the training loss)
    perplexity      exp(loss)
    token_accuracy  share of trained tokens where argmax p(· | x_<t) = x_t (teacher forcing)
    exact_match     share of rows whose greedy completion equals the reference answer
                    (both stripped of surrounding whitespace)
    normalized_match  the same after lower-casing and collapsing every whitespace run to one space

Generation prompts are the rows rendered as in training up to the answer
(`ftkit.data.render_prompt`), decoded greedily in batches with left padding; each row
may generate its reference's length + GENERATION_SLACK_TOKENS tokens (`--max-new-tokens`
overrides), enough to see a model that does not stop. `--baseline` measures the base the
same way: an adapter is switched off with peft's `disable_adapter()` (same weights in
memory, nothing reloaded), a full fine-tune's base is loaded from the run.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from ftkit.data import Example, collate, render_prompt
from ftkit.models.target import Target, adapter_disabled, load_model
from ftkit.recipe.schema import Recipe
from ftkit.tasks.evaluation import EvalOptions, EvalSet, Evaluation, compared, trained_tokens
from ftkit.tasks.generation import (
    Sampling,
    VllmGenerator,
    build_prompt,
    generate_texts,
    stream_one,
    vllm_can_serve,
    vllm_usable,
)
from ftkit.tasks.losses import CausalLMLoss
from ftkit.tasks.objective import evaluate
from ftkit.tasks.prediction import Inputs, PredictOptions, write_predictions

#: tokens each row may generate beyond its reference's length: room to show a model that does not stop
GENERATION_SLACK_TOKENS = 16
#: `generate(prompts, budgets) -> texts`: a model (transformers or vLLM) writing completions
Generate = Callable[[list[str], list[int]], list[str]]


class SFT:
    """Supervised fine-tuning: next-token cross-entropy on trained tokens.

    loss = Σ_{t trained} −log p(x_t | x_<t)  /  (number of trained tokens in the window)

    The sum comes from `lm_loss` (ftkit.tasks.losses): chunked over the vocabulary, so full
    fp32 logits never exist, and packed batches keep attention inside each example.
    """

    name = "sft"
    reports_perplexity = True

    def __init__(self, lm_loss: CausalLMLoss | None = None):
        self.lm_loss = lm_loss or CausalLMLoss()

    def collate(self, examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(examples, pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens that carry a loss (labels shifted by one, as in `loss_sum`)."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.lm_loss(model, batch), {}


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: the device of its first parameter that is not on the meta device."""
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def token_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the batch's T input positions, shape (batch, T, vocab).

    Prompt tuning and P-tuning (peft) prepend n virtual tokens to the input, so the model
    returns T + n positions, the virtual ones first; position t of the input is position
    n + t of the output. Keeping the last T realigns them with the labels.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, -batch["input_ids"].shape[1] :, :]


def full_logits_sft() -> Any:
    """The SFT objective computing its loss from the model's full logits (`chunk_size=None`).

    Used wherever a model is only evaluated: the sum is the training loss (equal to the
    chunked one to float rounding), and it works on any model (adapted heads, disk-offloaded
    layers) without the chunked path's probe.
    """
    return SFT(CausalLMLoss(chunk_size=None))


class SFTWithAccuracy:
    """The SFT objective (same loss code) plus a count of correctly predicted trained tokens.

    Accuracy needs the logits, so the training loss runs in its full-logits mode
    (`CausalLMLoss(chunk_size=None)`: the same sum, equal to the chunked one to float
    rounding), and the model is wrapped so that forward pass hands its logits over:
    one forward per batch.
    """

    def __init__(self) -> None:
        self._sft = full_logits_sft()

    def collate(self, examples: Sequence[Any], pad_id: int) -> dict:
        return self._sft.collate(examples, pad_id)

    def units(self, batch: dict) -> int:
        return self._sft.units(batch)

    def loss_sum(self, model: Any, batch: dict) -> tuple[Any, dict[str, Any]]:
        seen: dict[str, Any] = {}

        def forward(**inputs: Any) -> Any:
            seen["out"] = out = model(**inputs)
            return out

        loss, metrics = self._sft.loss_sum(forward, batch)
        labels = batch["labels"][:, 1:]
        predicted = seen["out"].logits[:, :-1, :].argmax(dim=-1)
        correct = ((predicted == labels) & (labels != -100)).sum()
        return loss, metrics | {"token_accuracy": correct}


# ---------------------------------------------------------------- eval


def token_scores(model: Any, pad_id: int, examples: Sequence[Example], batch_size: int) -> dict[str, float]:
    """loss, perplexity and token_accuracy of one model on `examples` (teacher forcing)."""
    scores = evaluate(model, examples, batch_size, pad_id, input_device(model), SFTWithAccuracy())
    return {
        "loss": scores["loss"],
        "perplexity": math.exp(min(scores["loss"], 50.0)),
        "token_accuracy": scores["token_accuracy"],
    }


def normalize(text: str) -> str:
    """Lower-case, every whitespace run → one space, stripped."""
    return " ".join(text.split()).casefold()


def generation_scores(
    generate: Generate, tokenizer: Any, evalset: EvalSet, max_new_tokens: int | None
) -> tuple[dict[str, float], list[dict]]:
    """(exact_match / normalized_match, one record per row) from `generate(prompts, budgets) -> texts`."""
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


def evaluate_text(target: Target, tokenizer: Any, evalset: EvalSet, options: EvalOptions) -> Evaluation:
    """Token scores and generation scores of `target` (and of its base with `options.baseline`).

    Token scores come first, from the transformers model; with vLLM that model is freed
    before the engine takes the GPU, so the two never hold the weights at once.
    """
    batch_size, max_new_tokens = options.batch_size, options.max_new_tokens
    backend = "vllm" if options.generation and vllm_usable() and vllm_can_serve(target) is None else "transformers"
    greedy = Sampling(temperature=0.0)
    pad_id = tokenizer.pad_token_id

    def hf_generate(model: Any) -> Generate:
        return lambda prompts, budgets: generate_texts(model, tokenizer, prompts, greedy, batch_size, budgets)

    def base_scope(model: Any) -> Any:
        """A context in which `model` is the base: the adapter switched off (full fine-tunes: not used)."""
        return adapter_disabled(target, model) if target.is_adapter else contextlib.nullcontext()

    model = load_model(target, tokenizer)
    tuned = token_scores(model, pad_id, evalset.examples, batch_size)
    base = None
    if options.baseline and target.is_adapter:
        with base_scope(model):
            base = token_scores(model, pad_id, evalset.examples, batch_size)
    tuned_records: list[dict] = []
    base_records: list[dict] = []
    if options.generation and backend == "transformers":
        metrics, tuned_records = generation_scores(hf_generate(model), tokenizer, evalset, max_new_tokens)
        tuned |= metrics
        if base is not None:
            with base_scope(model):
                metrics, base_records = generation_scores(hf_generate(model), tokenizer, evalset, max_new_tokens)
            base |= metrics
    elif options.generation:
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
    if options.baseline and not target.is_adapter:  # a full fine-tune's base is another model
        del model
        gc.collect()
        model = load_model(target, tokenizer, base_only=True)
        base = token_scores(model, pad_id, evalset.examples, batch_size)
        if options.generation:
            metrics, base_records = generation_scores(hf_generate(model), tokenizer, evalset, max_new_tokens)
            base |= metrics
    if base is not None:
        for row, base_row in zip(tuned_records, base_records, strict=True):
            row["base_generated"] = base_row["generated"]
    return Evaluation(
        text_fields(target, evalset, tuned, base, backend if options.generation else None), "generations", tuned_records
    )


def text_fields(
    target: Target, evalset: EvalSet, tuned: dict, base: dict | None, backend: str | None
) -> dict[str, Any]:
    """The eval result's fields of a causal LM (and of a preference model, which generates nothing here)."""
    return (
        evalset.described()
        | {"target_tokens": trained_tokens(evalset.examples), "generation_backend": backend}
        | compared(tuned, base, target.base)
    )


# ---------------------------------------------------------------- predict


def predict_text(target: Target, tokenizer: Any, inputs: Inputs, options: PredictOptions, out: TextIO) -> list[str]:
    """Completions of the inputs, rendered as the run's format was in training (ftkit.tasks.generation).

    One --prompt is streamed token by token (vLLM: written when done); plain lines → one
    completion per line (newlines inside written as `\\n`); JSONL rows → the same rows with a
    `completion` field added. Returns the completions.
    """
    prompts = [
        build_prompt(item, target.data_format, tokenizer, options.template, source=inputs.source(i))
        for i, item in enumerate(inputs.items)
    ]
    sampling = options.sampling
    if vllm_usable() and vllm_can_serve(target) is None:
        completions = VllmGenerator(target, tokenizer, sampling.seed).generate(prompts, sampling)
        if inputs.from_prompt:
            out.write(completions[0] + "\n")
            out.flush()
    else:
        model = load_model(target, tokenizer)
        if inputs.from_prompt:
            completions = [stream_one(model, tokenizer, prompts[0], sampling, out)]
        else:
            completions = generate_texts(model, tokenizer, prompts, sampling, options.batch_size)
    if not inputs.from_prompt:
        lines = [completion.replace("\n", "\\n") for completion in completions]
        write_predictions(out, inputs, lines, [{"completion": completion} for completion in completions])
    return completions


class CausalLMTask:
    """Supervised fine-tuning of a causal LM: the model learns to write the answers."""

    name = "causal_lm"
    generates_text = True
    summary_key = None
    model_kind = "causal LM"
    data_formats = ("alpaca", "chat", "text")

    def objective(
        self, recipe: Recipe, model: Any, splits: Any, run_dir: Path, device: Any, pad_id: int
    ) -> tuple[SFT, dict]:
        return SFT(CausalLMLoss.from_recipe(recipe)), {}

    def scoring_objective(self, recipe: Recipe) -> SFT:
        return SFT()

    def summarize(self, records: list[dict], facts: dict) -> dict | None:
        return None  # the loss curves and samples of every run are the whole story

    def report_section(self, summary: dict, facts: dict) -> str:
        return ""

    def synthetic_examples(self, rows: list[list[int]]) -> list[Example]:
        """Random token rows as examples (merge verification without data): every token after the first trains."""
        return [Example(row, [-100, *row[1:]], f"synthetic:{i}") for i, row in enumerate(rows)]

    def score(self, model: Any, examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, float]:
        """(logits at the real positions of `examples` in one right-padded batch, float32 on the CPU, and
        their SFT loss): what a merge must reproduce."""
        device = input_device(model)
        batch = collate(examples, pad_id)
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
        real = batch["attention_mask"].bool()
        loss = evaluate(model, examples, len(examples), pad_id, device, full_logits_sft())["loss"]
        return logits.float().cpu()[real], loss

    def evaluate(self, target: Target, tokenizer: Any, evalset: EvalSet, options: EvalOptions) -> Evaluation:
        return evaluate_text(target, tokenizer, evalset, options)

    def predict(
        self, target: Target, tokenizer: Any, inputs: Inputs, options: PredictOptions, out: TextIO
    ) -> list[str]:
        return predict_text(target, tokenizer, inputs, options, out)
