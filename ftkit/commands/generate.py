"""`ftkit generate`: the model's prediction for each input, on stdout.

    read the inputs (--prompt, or stdin) → load_tokenizer → task_of(target).predict → stdout

What a prediction is belongs to the task (ftkit.tasks): a causal LM writes a completion (the
prompt rendered as in training, greedy or sampled; one --prompt is streamed token by token;
ftkit.tasks.generation), a classifier names a label. Inputs: one --prompt, or stdin with one
input per line, or JSONL rows, which come back as the same rows with the prediction added.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

from ftkit.commands import medusa
from ftkit.errors import ArgumentError, DataError
from ftkit.io import data as data_stream
from ftkit.methods.medusa_decode import is_medusa_target
from ftkit.models.target import Target, load_tokenizer
from ftkit.tasks import task_of
from ftkit.tasks.generation import Sampling
from ftkit.tasks.prediction import Inputs, PredictOptions

NO_INPUTS = "no prompts: give --prompt TEXT or pipe prompts on stdin (one per line, or JSONL)"


def command_inputs(prompt: str | None, stdin: TextIO | None) -> Inputs:
    """[--prompt], else the items piped on stdin (`read_stdin_items`); ArgumentError when there is neither."""
    stdin = stdin or sys.stdin
    if prompt is None and stdin.isatty():
        raise ArgumentError(NO_INPUTS)
    if prompt is not None:
        return Inputs([prompt], is_jsonl=False, from_prompt=True)
    items, is_jsonl = read_stdin_items(stdin)
    return Inputs(items, is_jsonl, from_prompt=False)


def read_stdin_items(stream: TextIO) -> tuple[list[str | dict], bool]:
    """(items, is_jsonl) from stdin: JSONL when every non-empty line is a JSON object, else one input per line."""
    lines = [(n, line.rstrip("\n")) for n, line in enumerate(stream, start=1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        raise ArgumentError(NO_INPUTS)
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
    target: Target,
    prompt: str | None,
    sampling: Sampling,
    batch_size: int = 8,
    template: bool = True,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> list[str]:
    """`ftkit generate`: the task's prediction for every input, written to `stdout`; returns them."""
    stdout = stdout or data_stream()
    inputs = command_inputs(prompt, stdin)
    tokenizer = load_tokenizer(target)
    options = PredictOptions(sampling, batch_size, template)
    if is_medusa_target(target):  # speculative decoding with the run's heads
        return medusa.predict(target, tokenizer, inputs, options, stdout)
    return task_of(target).predict(target, tokenizer, inputs, options, stdout)
