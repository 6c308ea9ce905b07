"""The byte-level tokenizer of the built-in models, and the fallback chat template.

`build_byte_tokenizer()` builds a real `tokenizers` tokenizer in code, so tests and
built-in models never download anything. Token id `b` (0..255) is the byte `b`
(ByteLevel alphabet, BPE with no merges), so any unicode text round-trips exactly and
one UTF-8 byte costs one token. Six special tokens follow:

    256 <|pad|>   257 <|bos|>   258 <|eos|>   259 <|system|>   260 <|user|>   261 <|assistant|>

`len(tokenizer) == 262` is the model's vocab size. Padding is its own token, never EOS:
labels at padding are masked, while EOS must be learned.

Its chat template is as short as byte-level sequences need (role markers are single tokens):

    <|bos|><|system|>{system}<|user|>{user}<|assistant|>{answer}<|eos|><|user|>...

Each assistant turn ends with EOS, so generation stops there; `add_generation_prompt`
appends `<|assistant|>`. Only the roles system, user and assistant are accepted.

`DEFAULT_CHAT_TEMPLATE` is ChatML, used for a tokenizer that has no chat template of its own:

    <bos?><|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n

It writes no EOS itself (a base tokenizer's EOS may be anything); the data pipeline
appends EOS after the final assistant turn and trains it.
"""

from __future__ import annotations

from typing import Any

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ m['role'] ~ '; use system, user or assistant') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte 0..255 (GPT-2's bytes_to_unicode), indexed by byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            # bytes without a printable glyph are moved past 255, as ByteLevel does
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def build_byte_tokenizer() -> Any:
    """A `transformers.PreTrainedTokenizerFast` over raw UTF-8 bytes; see the module docstring for ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # no regex split: with no merges it would change nothing and only cost time
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([PAD, BOS, EOS, *ROLE_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS),
        # the default clean-up rewrites " ." to "." on decode, which breaks the round trip
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    return tokenizer
