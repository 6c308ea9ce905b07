"""A raw row → (prompt ready for generation, reference answer), as the model saw it in training.

For generation and eval in every format: the prompt is the training text up to the answer,
the reference is the answer.
"""

from __future__ import annotations

from typing import Any

from ftkit.data.formats import render, text_of, to_messages
from ftkit.data.preference import pair_messages
from ftkit.data.prompt_rows import prompt_text


def render_prompt(row: dict, fmt: str, tokenizer: Any) -> tuple[str, str]:
    """(prompt ready for generation, reference answer) of a raw row, as the model saw it in training.

    The prompt already holds the template's special tokens (BOS included where the template
    writes it): encode it with `add_special_tokens=False`. chat/alpaca: the conversation up
    to the last assistant message plus the generation prompt, and that message as reference.
    text: bos + the first half of the text (cut at a space), and the rest as reference.
    preference: the prompt plus the generation prompt, and the chosen answer as reference.
    prompt: the prompt plus the generation prompt, and the row's `answer` (or "") as reference.
    """
    source = "prompt row"
    if fmt == "prompt":  # grpo's rows: the reference is the optional answer
        answer = row.get("answer")
        return prompt_text(row, source, tokenizer), answer if isinstance(answer, str) else ""
    if fmt == "preference":
        prompt, chosen, _ = pair_messages(row, source)
        return render(prompt, tokenizer, True, source), chosen
    if fmt == "text":
        text = text_of(row, source)
        cut = text.find(" ", len(text) // 2)
        cut = len(text) // 2 if cut < 0 else cut
        return (tokenizer.bos_token or "") + text[:cut], text[cut:]
    messages = to_messages(row, fmt, source)
    return render(messages[:-1], tokenizer, True, source), messages[-1]["content"]
