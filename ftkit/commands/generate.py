"""Text generation: prompts as the model saw them in training, decoded greedily or sampled.

    build_prompt(item, fmt, tokenizer, template)   a string or JSONL row → prompt text
    generate_texts(model, tokenizer, prompts, ...) batched generation (left padding), in input order
    run_generate(...)                              `ftkit generate`: --prompt streams, stdin → stdout

Prompts go through the same rendering as training: a run trained in `alpaca` or `chat`
format gets the tokenizer's chat template with the generation prompt (user message =
the prompt), a `text` run gets BOS + the raw text. A model without a run uses its chat
template when it has one (`--raw` turns that off).

Batches are left-padded, so every row's last prompt token sits at the same position
and new tokens are appended right after it; the attention mask hides the padding and
transformers derives positions from it, so a row's greedy output does not depend on
the rows it is batched with (a test holds batch = one-by-one).

Sampling: temperature 0 is greedy; otherwise softmax(logits / temperature), cut to the
smallest set of tokens whose probability reaches top_p, sampled from torch's generator
seeded with `seed` once per call, so the same inputs, seed and batch size give the same text.

vLLM is used when it is importable and a CUDA GPU is present (`vllm_usable()`) and the
adapter is one its LoRA support loads (`vllm_can_serve`); it gets the exact prompt token ids
and the adapter as a LoRA request, and prints a single prompt's completion when it is done
(no token streaming). Otherwise transformers' `generate` runs, on any device.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from ftkit.errors import ArgumentError, DataError
from ftkit.io import data as data_stream


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
    from ftkit.data.formats import render

    if isinstance(item, dict):
        messages = _row_messages(item, source)
        if messages is None:
            return build_prompt(_row_text(item, source), fmt, tokenizer, template, source)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return render(messages, tokenizer, True, source)
    uses_chat = fmt in ("alpaca", "chat") or (fmt is None and template and bool(tokenizer.chat_template))
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
    import torch

    ids = encode_prompts(tokenizer, prompts)
    budgets = list(max_new_tokens) if max_new_tokens is not None else [sampling.max_new_tokens] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    texts: list[str] = [""] * len(ids)
    with torch.random.fork_rng(devices=_cuda_devices()):
        torch.manual_seed(sampling.seed)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            budget = max(budgets[i] for i in rows)
            outputs = _generate_batch(model, tokenizer, [ids[i] for i in rows], budget, sampling)
            for i, new in zip(rows, outputs, strict=True):
                texts[i] = tokenizer.decode(new[: budgets[i]], skip_special_tokens=True)
    return texts


def _generate_batch(
    model: Any, tokenizer: Any, batch: list[list[int]], max_new_tokens: int, sampling: Sampling, streamer: Any = None
) -> list[list[int]]:
    """New token ids per row (up to, not including, EOS), from one left-padded `generate` call."""
    import torch

    device = next(model.parameters()).device
    width = max(len(row) for row in batch)
    input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, row in enumerate(batch):
        input_ids[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[r, width - len(row) :] = 1
    kwargs: dict[str, Any] = {"do_sample": not sampling.greedy}
    if not sampling.greedy:
        kwargs |= {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
            **kwargs,
        )
    new_rows = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        new_rows.append(row)
    return new_rows


def _cuda_devices() -> list[int]:
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def vllm_usable() -> bool:
    """vLLM generates only when it is installed and a CUDA GPU is present; otherwise transformers does."""
    import importlib.util

    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


class VllmGenerator:
    """A vLLM engine on the target's base, holding the adapter as a LoRA request.

    One engine serves both the tuned model (with the LoRA request) and the base (without),
    so `--baseline` needs no second engine on the GPU. Prompts are passed as token ids, so
    the engine sees exactly the tokens transformers would (vLLM would otherwise tokenize the
    text and may add a second BOS).
    """

    def __init__(self, target: Any, tokenizer: Any, seed: int = 0):
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.tokenizer = tokenizer
        rank = _adapter_rank(target.weights) if target.is_adapter else None
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


def _adapter_rank(adapter_dir: str) -> int:
    from pathlib import Path

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return max([int(config.get("r", 8)), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def vllm_can_serve(target: Any) -> str | None:
    """Why vLLM cannot serve this target (None when it can): it has no LoRA support for modules_to_save."""
    if not target.is_adapter:
        return None
    from pathlib import Path

    config = json.loads((Path(target.weights) / "adapter_config.json").read_text())
    if config.get("modules_to_save"):
        return "the adapter trains whole modules (modules_to_save), which vLLM's LoRA cannot load"
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
        return f"vLLM serves plain LoRA adapters, not {kind}"
    return None


def command_inputs(prompt: str | None, stdin: TextIO | None, missing: str) -> tuple[list, bool]:
    """(inputs, is_jsonl) of `ftkit generate`: [--prompt], else the items piped on stdin (`read_stdin_items`);
    ArgumentError(`missing`) when there is neither."""
    stdin = stdin or sys.stdin
    if prompt is None and stdin.isatty():
        raise ArgumentError(missing)
    return ([prompt], False) if prompt is not None else read_stdin_items(stdin)


def read_stdin_items(stream: TextIO) -> tuple[list[str | dict], bool]:
    """(items, is_jsonl) from stdin: JSONL when every non-empty line is a JSON object, else one prompt per line."""
    lines = [(n, line.rstrip("\n")) for n, line in enumerate(stream, start=1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        raise ArgumentError("no prompts: give --prompt TEXT or pipe prompts on stdin (one per line, or JSONL)")
    is_jsonl = all(line.lstrip().startswith("{") for _, line in lines)
    if not is_jsonl:
        return [line for _, line in lines], False
    rows: list[str | dict] = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"stdin:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"stdin:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows, True


def run_generate(
    target: Any,
    prompt: str | None,
    sampling: Sampling,
    batch_size: int = 8,
    template: bool = True,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> list[str]:
    """`ftkit generate`: one --prompt is streamed token by token; stdin prompts are batched.

    stdin: one prompt per line → one completion per line (newlines inside a completion
    written as `\\n`); JSONL rows → the same rows with a `completion` field added.
    Returns the completions.
    """
    from ftkit.models.target import load_model, load_tokenizer

    if getattr(target, "task", "causal_lm") == "classification":  # a classifier predicts labels, writes no text
        from ftkit.commands.classify import run_predict

        return run_predict(target, prompt, batch_size, stdin, stdout)
    stdout = stdout or data_stream()
    items, is_jsonl = command_inputs(
        prompt, stdin, "no prompts: give --prompt TEXT or pipe prompts on stdin (one per line, or JSONL)"
    )
    tokenizer = load_tokenizer(target)
    fmt = target.data_format
    prompts = [
        build_prompt(item, fmt, tokenizer, template, source=f"stdin:{i + 1}" if prompt is None else "--prompt")
        for i, item in enumerate(items)
    ]
    use_vllm = vllm_usable() and vllm_can_serve(target) is None
    if use_vllm:
        completions = VllmGenerator(target, tokenizer, sampling.seed).generate(prompts, sampling)
        if prompt is not None:
            stdout.write(completions[0] + "\n")
    else:
        model = load_model(target, tokenizer)
        if prompt is not None:
            completions = [_stream_one(model, tokenizer, prompts[0], sampling)]
        else:
            completions = generate_texts(model, tokenizer, prompts, sampling, batch_size)
    if prompt is None:
        for item, completion in zip(items, completions, strict=True):
            if is_jsonl:
                stdout.write(json.dumps({**item, "completion": completion}, ensure_ascii=False) + "\n")
            else:
                stdout.write(completion.replace("\n", "\\n") + "\n")
    stdout.flush()
    return completions


def _stream_one(model: Any, tokenizer: Any, prompt: str, sampling: Sampling) -> str:
    """Generate for one prompt, writing each piece of text to stdout as it is decoded."""
    import torch
    from transformers import TextStreamer

    ids = encode_prompts(tokenizer, [prompt])

    class DataStreamer(TextStreamer):
        """TextStreamer prints; this writes each decoded piece to the command's stdout instead."""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out = data_stream()
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    streamer = DataStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.random.fork_rng(devices=_cuda_devices()):
        torch.manual_seed(sampling.seed)
        new = _generate_batch(model, tokenizer, ids, sampling.max_new_tokens, sampling, streamer=streamer)[0]
    return tokenizer.decode(new, skip_special_tokens=True)
