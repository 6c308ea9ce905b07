"""The built-in byte tokenizer: exact round trips, distinct pad/eos, a chat template that survives saving."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ftkit.data.formats import DEFAULT_CHAT_TEMPLATE
from ftkit.models.builtin import build_byte_tokenizer

TEXTS = [
    "hello world",
    " leading and trailing spaces  ",
    "punctuation , . ! ? don 't",  # the default decode clean-up would rewrite " ." and " '"
    "tabs\tand\nnewlines\r\n",
    "héllo wörld — ¿qué? 日本語 🤗 👩‍👩‍👧",
    "\x00\x7f control bytes",
    "",
]

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def test_ids_are_bytes_then_special_tokens(tok):
    assert tok.encode("Aé", add_special_tokens=False) == [65, 0xC3, 0xA9]
    specials = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id]
    assert specials == [256, 257, 258]
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == 262 <= 272


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(tok, text):
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte, nothing added
    assert tok.decode(ids) == text


def test_save_and_reload_keep_ids_and_template(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    for text in [*TEXTS, rendered]:
        assert again.encode(text) == tok.encode(text)
        assert again.decode(again.encode(text)) == text
    assert again.chat_template == tok.chat_template
    assert again.apply_chat_template(CHAT, tokenize=False) == rendered
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (256, 257, 258)
    assert len(again) == len(tok)


def test_chat_template_is_compact_and_ends_turns_with_eos(tok):
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert rendered == "<|bos|><|system|>Be brief.<|user|>2+2?<|assistant|>4<|eos|>"
    ids = tok.encode(rendered)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 4 + len("Be brief.") + len("2+2?") + len("4") + 1  # role markers are single tokens
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(prompt) and prompt.endswith("<|assistant|>")
    assert tok.decode(ids, skip_special_tokens=True) == "Be brief.2+2?4"


def test_chat_template_refuses_unknown_roles(tok):
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_default_template_is_chatml(tok):
    rendered = tok.apply_chat_template(
        CHAT[1:2], chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|bos|><|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
