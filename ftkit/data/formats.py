"""Rows → conversations → rendered text with the character spans the loss is computed on.

Formats (`data.format`):
- alpaca: {instruction, input?, output, system?} becomes the conversation
  [system?, user: instruction + ("\\n\\n" + input if input), assistant: output] and goes
  through the same chat path as `chat`.
- chat: {messages: [{role, content}, ...]}, rendered with the tokenizer's chat template
  (`DEFAULT_CHAT_TEMPLATE` when it has none). The last message must be the assistant's.
- text: {text}, trained on every token: bos? + text + eos.
- preference: {prompt, chosen, rejected}, two conversations sharing the prompt, only the
  answers trained (ftkit.data.preference).

Assistant spans come from prefix rendering: for assistant message i,
render(messages[:i], add_generation_prompt=True) must be a prefix of render(messages[:i+1]),
which must be a prefix of the whole conversation; the characters in between are
assistant i's (its content and whatever closes the turn, such as EOS). A template
that rewrites earlier turns (e.g. one that drops past reasoning) breaks this and is
refused, since its training text would not match what the model sees when generating.
"""

from __future__ import annotations

from typing import Any

from ftkit.errors import DataError

FORMAT_FIELDS = {
    "alpaca": "instruction, output (optional: input, system)",
    "chat": "messages: [{role, content}, ...] ending with an assistant message",
    "text": "text",
    "preference": "prompt, chosen, rejected (see ftkit.data.preference)",
}

Span = tuple[int, int]


#: ChatML, for a tokenizer without a chat template of its own. It writes no EOS itself (a base
#: tokenizer's EOS may be anything); encoding appends EOS after the final assistant turn and trains it.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def to_messages(row: dict, fmt: str, source: str) -> list[dict[str, str]]:
    """The conversation of an alpaca or chat row, checked; DataError naming `source` and the field."""
    if fmt == "alpaca":
        instruction = _string_field(row, "instruction", fmt, source)
        output = _string_field(row, "output", fmt, source)
        extra = _string_field(row, "input", fmt, source, required=False)
        system = _string_field(row, "system", fmt, source, required=False)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")})
        messages.append({"role": "assistant", "content": output})
    elif fmt == "chat":
        messages = _chat_messages(row, source)
    else:
        raise ValueError(f"format {fmt!r} has no messages")
    if not messages[-1]["content"].strip():
        what = "field 'output'" if fmt == "alpaca" else "the last assistant message"
        raise DataError(f"{source}: nothing to train on: {what} is empty; fill it in or remove the row")
    return messages


def text_of(row: dict, source: str) -> str:
    """The `text` field of a text-format row, checked."""
    return _string_field(row, "text", "text", source)


def _string_field(row: dict, field: str, fmt: str, source: str, required: bool = True) -> str:
    value = row.get(field)
    if value is None:
        if not required:
            return ""
        # repr for keys with newlines or control characters: the error must stay one line
        keys = [key if key.isprintable() else repr(key) for key in sorted(map(str, row))]
        have = ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "") or "none"
        raise DataError(f"{source}: missing field {field!r} (format {fmt} needs {FORMAT_FIELDS[fmt]}; row has {have})")
    if not isinstance(value, str):
        raise DataError(f"{source}: field {field!r} must be a string (format {fmt}), got {type(value).__name__}")
    return value


def _chat_messages(row: dict, source: str) -> list[dict[str, str]]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "nothing" if messages is None else type(messages).__name__
        raise DataError(
            f"{source}: field 'messages' must be a non-empty list (format chat needs "
            f"{FORMAT_FIELDS['chat']}), got {got}"
        )
    checked = []
    for i, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(f"{source}: messages[{i}] must be {{role: string, content: string}}, got {message!r:.80}")
        checked.append({"role": message["role"], "content": message["content"]})
    if checked[-1]["role"] != "assistant":
        raise DataError(
            f"{source}: the last message is {checked[-1]['role']!r}; a chat example must end with the "
            "assistant message to learn"
        )
    if checked[0]["role"] == "assistant":
        raise DataError(f"{source}: the conversation starts with the assistant; put a system or user message first")
    return checked


def render(messages: list[dict[str, str]], tokenizer: Any, add_generation_prompt: bool, source: str) -> str:
    """The conversation as text through the tokenizer's chat template (ChatML when it has none)."""
    template = None if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except Exception as err:  # jinja raises TemplateError, templates raise their own messages
        raise DataError(f"{source}: the chat template rejects this conversation: {err}") from err


def render_chat(messages: list[dict[str, str]], tokenizer: Any, source: str) -> tuple[str, list[Span]]:
    """(full text, [(start, end) character span of each assistant turn]) by prefix rendering."""
    full = render(messages, tokenizer, False, source)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], tokenizer, True, source)
        through = render(messages[: i + 1], tokenizer, False, source)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"{source}: the chat template is not prefix-consistent at message {i} (rendering the turns before "
                "it plus the generation prompt is not a prefix of rendering it), so its assistant tokens cannot be "
                "found; use a template that renders earlier turns unchanged (e.g. unset it to use ChatML)"
            )
        spans.append((len(before), len(through)))
    return full, spans
