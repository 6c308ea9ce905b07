"""Text generation of a causal LM: prompts as the model saw them in training, decoded greedily or sampled.

    build_prompt(item, fmt, tokenizer, template)   a string or JSONL row → prompt text
    generate_texts(model, tokenizer, prompts, ...) batched generation (left padding), in input order
    stream_one(model, tokenizer, prompt, ...)      one prompt, each piece of text written as it is decoded
    VllmGenerator(target, tokenizer)               the same through vLLM, when `vllm_usable` and `vllm_can_serve`

Prompts go through the same rendering as training: a run trained in `alpaca` or `chat`
format gets the tokenizer's chat template with the generation prompt (user message =
the prompt), a `text` run gets BOS + the raw text. A model without a run uses its chat
template when it has one (`template=False` turns that off).

Batches are left-padded (`tokenizer.pad(..., padding_side="left")`), so every row's last
prompt token sits at the same position and new tokens are appended right after it; the
attention mask hides the padding and transformers derives positions from it, so a row's
greedy output does not depend on the rows it is batched with (a test holds batch = one-by-one).

Sampling: temperature 0 is greedy; otherwise softmax(logits / temperature), cut to the
smallest set of tokens whose probability reaches top_p, sampled from torch's generator
seeded with `seed` once per call, so the same inputs, seed and batch size give the same text.

vLLM is used when it is importable and a CUDA GPU is present (`vllm_usable()`) and the
adapter is one its LoRA support loads (`vllm_can_serve`); it gets the exact prompt token ids
and the adapter as a LoRA request (no token streaming). Otherwise transformers' `generate`
runs, on any device.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import TextStreamer

from ftkit.data.formats import render
from ftkit.errors import DataError
from ftkit.models.hf_files import adapter_config, adapter_rank
from ftkit.models.target import Target


@dataclass
class Sampling:
    """How new tokens are chosen; temperature 0 means greedy (argmax)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def build_prompt(
    item: str | dict, fmt: str | None, tokenizer: Any, template: bool = True, source: str = "prompt"
) -> str:
    """Prompt text for a plain string or a JSONL row, rendered as the run's format was in training.

    Rows: {"prompt": str} (like a plain string), {"messages": [...]} (a trailing assistant
    message is dropped), {"instruction", "input"?, "system"?} (alpaca), {"text": str} (raw).
    """
    if isinstance(item, dict):
        messages = _row_messages(item, source)
        if messages is None:
            return build_prompt(_row_text(item, source), fmt, tokenizer, template, source)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return render(messages, tokenizer, True, source)
    uses_chat = fmt in ("alpaca", "chat", "prompt") or (fmt is None and template and bool(tokenizer.chat_template))
    if uses_chat and template:
        return render([{"role": "user", "content": item}], tokenizer, True, source)
    return (tokenizer.bos_token or "") + item


def _row_messages(row: dict, source: str) -> list[dict[str, str]] | None:
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise DataError(f"{source}: field 'messages' must be a list of {{role, content}} strings")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in row:
        instruction, extra, system = (row.get(k) or "" for k in ("instruction", "input", "system"))
        if not all(isinstance(v, str) for v in (instruction, extra, system)):
            raise DataError(f"{source}: fields instruction, input and system must be strings")
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")}]
    return None


def _row_text(row: dict, source: str) -> str:
    for key in ("prompt", "text"):
        if isinstance(row.get(key), str):
            return row[key]
    have = ", ".join(sorted(row)) or "none"
    raise DataError(f"{source}: a JSONL row needs 'prompt', 'messages', 'instruction' or 'text' (it has {have})")


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered prompts; they already hold the template's special tokens."""
    return [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    sampling: Sampling,
    batch_size: int = 8,
    max_new_tokens: Sequence[int] | None = None,
) -> list[str]:
    """Completions of `prompts` (in input order), batched by similar prompt length.

    `max_new_tokens[i]` is row i's budget (a batch runs to the largest in it; longer
    rows are cut back to their own budget); default `sampling.max_new_tokens`.
    """
    ids = encode_prompts(tokenizer, prompts)
    budgets = list(max_new_tokens) if max_new_tokens is not None else [sampling.max_new_tokens] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    texts: list[str] = [""] * len(ids)
    with torch.random.fork_rng(devices=_cuda_devices()):
        torch.manual_seed(sampling.seed)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            budget = max(budgets[i] for i in rows)
            outputs = generate_batch(model, tokenizer, [ids[i] for i in rows], budget, sampling)
            for i, new in zip(rows, outputs, strict=True):
                texts[i] = tokenizer.decode(new[: budgets[i]], skip_special_tokens=True)
    return texts


def generate_batch(
    model: Any, tokenizer: Any, batch: list[list[int]], max_new_tokens: int, sampling: Sampling, streamer: Any = None
) -> list[list[int]]:
    """New token ids per row (up to, not including, EOS), from one left-padded `generate` call."""
    device = next(model.parameters()).device
    padded = tokenizer.pad({"input_ids": batch}, padding=True, padding_side="left", return_tensors="pt")
    kwargs: dict[str, Any] = {"do_sample": not sampling.greedy}
    if not sampling.greedy:
        kwargs |= {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    with torch.no_grad():
        out = model.generate(
            input_ids=padded["input_ids"].to(device),
            attention_mask=padded["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
            **kwargs,
        )
    new_rows = []
    for row in out[:, padded["input_ids"].shape[1] :].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        new_rows.append(row)
    return new_rows


class _WriterStreamer(TextStreamer):
    """TextStreamer prints; this writes each decoded piece to a given stream instead."""

    def __init__(self, tokenizer: Any, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def stream_one(model: Any, tokenizer: Any, prompt: str, sampling: Sampling, out: TextIO) -> str:
    """Generate for one prompt, writing each piece of text to `out` as it is decoded; return the completion."""
    ids = encode_prompts(tokenizer, [prompt])
    with torch.random.fork_rng(devices=_cuda_devices()):
        torch.manual_seed(sampling.seed)
        new = generate_batch(
            model, tokenizer, ids, sampling.max_new_tokens, sampling, streamer=_WriterStreamer(tokenizer, out)
        )[0]
    return tokenizer.decode(new, skip_special_tokens=True)


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def vllm_usable() -> bool:
    """vLLM generates only when it is installed and a CUDA GPU is present; otherwise transformers does."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def vllm_can_serve(target: Target) -> str | None:
    """Why vLLM cannot serve this target (None when it can): it has no LoRA support for modules_to_save."""
    if not target.is_adapter:
        return None
    if target.bottleneck:
        return "bottleneck adapters are ftkit's own modules, which vLLM cannot load"
    config = adapter_config(Path(target.weights))
    if getattr(config, "modules_to_save", None):
        return "the adapter trains whole modules (modules_to_save), which vLLM's LoRA cannot load"
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    use_dora = bool(getattr(config, "use_dora", False))
    if peft_type != "LORA" or use_dora:
        return f"vLLM serves plain LoRA adapters, not {'DoRA' if use_dora else peft_type}"
    return None


class VllmGenerator:
    """A vLLM engine on the target's base, holding the adapter as a LoRA request.

    One engine serves both the tuned model (with the LoRA request) and the base (without),
    so `--baseline` needs no second engine on the GPU. Prompts are passed as token ids, so
    the engine sees exactly the tokens transformers would (vLLM would otherwise tokenize the
    text and may add a second BOS).
    """

    def __init__(self, target: Target, tokenizer: Any, seed: int = 0):
        # vLLM is optional (a GPU extra): imported only when it is about to serve
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.tokenizer = tokenizer
        rank = adapter_rank(Path(target.weights)) if target.is_adapter else None
        self.engine = LLM(
            model=target.base if target.is_adapter else target.weights,
            tokenizer=target.tokenizer_source,
            enable_lora=rank is not None,
            max_lora_rank=max(rank or 8, 8),
            seed=seed,
            quantization="bitsandbytes" if target.model_cfg.quantization is not None else None,
        )
        self.lora = LoRARequest("ftkit-adapter", 1, target.weights) if rank is not None else None

    def generate(
        self,
        prompts: Sequence[str],
        sampling: Sampling,
        max_new_tokens: Sequence[int] | None = None,
        use_adapter: bool = True,
    ) -> list[str]:
        # vLLM is optional (a GPU extra): imported only when it serves
        from vllm import SamplingParams

        budgets = list(max_new_tokens) if max_new_tokens is not None else [sampling.max_new_tokens] * len(prompts)
        params = [
            SamplingParams(
                temperature=max(sampling.temperature, 0.0),
                top_p=sampling.top_p,
                max_tokens=budget,
                seed=sampling.seed,
                stop_token_ids=[self.tokenizer.eos_token_id],
                skip_special_tokens=True,
            )
            for budget in budgets
        ]
        requests = [{"prompt_token_ids": ids} for ids in encode_prompts(self.tokenizer, prompts)]
        outputs = self.engine.generate(requests, params, lora_request=self.lora if use_adapter else None)
        return [out.outputs[0].text for out in outputs]
