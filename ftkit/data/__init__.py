"""Data: load (sources) → format (formats) → tokenize + loss mask (encode) → batches.

load_splits(recipe.data, tokenizer, seed) -> Splits(train, val, stats)
batch_order(lengths, step_size, seed, epoch) -> [[index, ...], ...]   the optimizer steps of an epoch
split_step(step, micro_size) -> [[index, ...], ...]                  a step's micro-batches
collate(examples, pad_id) -> {input_ids, attention_mask, labels}
PreferencePair(chosen, rejected, source)     a `preference` row: two Examples sharing the prompt
ClassExample(input_ids, label, source)       a `classification` row: token ids and a class id
render_prompt(row, format, tokenizer) -> (prompt, reference)   for generation and eval
read_rows(path) -> [(row, "path:line"), ...]
"""

from ftkit.data.batches import batch_order, collate, micro_batch_order, split_step
from ftkit.data.classification import ClassExample
from ftkit.data.encode import Example
from ftkit.data.preference import PreferencePair
from ftkit.data.prompts import render_prompt
from ftkit.data.sources import read_rows
from ftkit.data.splits import Splits, load_splits

__all__ = [
    "ClassExample",
    "Example",
    "PreferencePair",
    "Splits",
    "batch_order",
    "collate",
    "load_splits",
    "micro_batch_order",
    "read_rows",
    "render_prompt",
    "split_step",
]
