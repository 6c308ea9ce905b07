"""A transformers model and its tokenizer as one GGUF file (llama.cpp, Ollama, LM Studio), through `gguf`'s writer.

What is written, for the Llama layout (`model_type: llama`: the built-ins and SmolLM2):

    metadata   general.*, llama.* (context length, widths, heads, head_dim as rope.dimension_count,
               rope base, RMS-norm epsilon, vocab size), general.file_type
    tokenizer  a byte-level BPE as `tokenizer.ggml.model: gpt2`: every token in id order (the byte
               alphabet spelling), its merges, token types (control for special added tokens,
               user-defined for other added tokens), bos / eos / pad / unk ids, add_bos_token, the
               pre-tokenizer's name (`pre`) and the chat template
    tensors    gguf's own HF → GGUF name map (`blk.N.attn_q.weight` ...); q_proj / k_proj rows are
               permuted as llama.cpp's convert_hf_to_gguf.py does (its rope pairs adjacent halves:
               rows (h, 2, d/2) → (h, d/2, 2)); transformers' GGUF loader undoes it. 1-D tensors
               (norms) stay float32, as llama.cpp keeps them; every 2-D one is stored in the type asked
               (f16, bf16, q8_0: blocks of 32 values sharing one f16 scale). A tied lm_head is not
               written (a file without output.weight is read as tied).

Anything the file cannot say is refused before a byte is written (`export_problems`): another
architecture, rope scaling, attention / MLP biases, a tokenizer with a normalizer or a split rule
GGUF has no name for, q8_0 on rows that are no multiple of 32 values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

#: --type → (tensor type of 2-D weights, the file type llama.cpp records)
TYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
#: GPT-2's split rule: what a ByteLevel pre-tokenizer with use_regex applies; llama.cpp calls it "gpt2"
GPT2_PRE = "gpt2"


def export_problems(model: Any, tokenizer: Any, qtype: str) -> list[str]:
    """Why this model and tokenizer cannot be written as GGUF `qtype` (empty when they can)."""
    config = model.config
    if config.model_type != "llama":
        return [
            f"a {config.model_type} model: export --gguf maps the Llama layout (llama: the built-ins, SmolLM2, "
            "Llama 2/3); merge it with `ftkit merge` and convert with llama.cpp's convert_hf_to_gguf.py"
        ]
    problems = []
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling {rope.get('rope_type')!r} is not written to GGUF by ftkit")
    for key in ("attention_bias", "mlp_bias"):
        if getattr(config, key, False):
            problems.append(f"config {key}: true; the Llama GGUF layout has no biases")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act {config.hidden_act}; Llama GGUF computes SiLU")
    try:
        tokenizer_fields(tokenizer, config.vocab_size)
    except ValueError as err:
        problems.append(str(err))
    if qtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        for name, tensor in model.state_dict().items():
            if tensor.dim() == 2 and tensor.shape[-1] % block:
                problems.append(
                    f"--type q8_0: {name} has rows of {tensor.shape[-1]} values, not a multiple of {block} "
                    "(q8_0's block); use --type f16 or bf16"
                )
                break
    return problems


def tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The tokenizer's GGUF fields; ValueError (one line) when GGUF cannot describe it."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE" or model.get("byte_fallback"):
        raise ValueError(
            f"the tokenizer is a {model['type']} model; export --gguf writes byte-level BPE tokenizers (gpt2 style)"
        )
    if spec.get("normalizer") is not None:
        raise ValueError(f"the tokenizer normalizes text first ({spec['normalizer']['type']}), which GGUF cannot say")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), has_merges=bool(model["merges"]))
    size = len(tokenizer)
    if size > vocab_size:
        raise ValueError(f"the tokenizer has {size} tokens but the model's embeddings only {vocab_size}")
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    types = []
    for token in tokens:
        if token in added:
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    # embeddings padded past the tokenizer (a vocab rounded up for speed): named placeholders, as llama.cpp does
    tokens += [f"[PAD{i}]" for i in range(size, vocab_size)]
    types += [gguf.TokenType.UNUSED] * (vocab_size - size)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    plain = tokenizer("a").input_ids
    return {
        "pre": pre,
        "tokens": tokens,
        "types": [int(t) for t in types],
        "merges": merges,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
        "add_bos": tokenizer.bos_token_id is not None and plain[:1] == [tokenizer.bos_token_id],
        "add_eos": tokenizer.eos_token_id is not None and plain[-1:] == [tokenizer.eos_token_id],
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


def _pre_tokenizer_name(pre: dict | None, has_merges: bool) -> str:
    """llama.cpp's name for how text is split before BPE (`tokenizer.ggml.pre`)."""
    steps = pre["pretokenizers"] if pre is not None and pre["type"] == "Sequence" else [pre] if pre else []
    byte_level = [s for s in steps if s["type"] == "ByteLevel"]
    splits = [s for s in steps if s["type"] == "Split"]
    if len(byte_level) != 1 or byte_level[0].get("add_prefix_space") or len(steps) != len(byte_level) + len(splits):
        raise ValueError(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:120]} is not byte-level BPE's")
    if not splits:
        # without merges the split rule cannot change a single id: GPT-2's is as good as none
        if byte_level[0].get("use_regex", True) or not has_merges:
            return GPT2_PRE
        raise ValueError("the tokenizer applies its merges across whole texts (no split rule), which GGUF cannot say")
    if len(splits) == 1 and not byte_level[0].get("use_regex", True):
        pattern = splits[0]["pattern"].get("Regex")
        for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():
            if pattern == known:
                return name
    raise ValueError("the tokenizer's split rule has no GGUF name (tokenizer.ggml.pre) that transformers reads back")


def stored(tensor: torch.Tensor, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A tensor as the file stores it: float32 for 1-D ones, `qtype` for 2-D ones (raw bytes for bf16 / q8_0)."""
    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim <= 1:
        return data, gguf.GGMLQuantizationType.F32
    kind = TYPES[qtype][0]
    return gguf.quants.quantize(data, kind), kind


def as_stored(tensor: torch.Tensor, qtype: str) -> torch.Tensor:
    """`tensor` rounded exactly as the file holds it, back in float32 (the reference for the read-back check)."""
    data, kind = stored(tensor, qtype)
    return torch.from_numpy(np.array(gguf.quants.dequantize(data, kind), dtype=np.float32)).reshape(tensor.shape)


def _permuted(weight: np.ndarray | torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: per head, rows (2, d/2) → (d/2, 2)."""
    weight = torch.as_tensor(weight)
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_gguf(model: Any, tokenizer: Any, path: Path, qtype: str, name: str) -> dict[str, int]:
    """Write `model` (a LlamaForCausalLM in float32) and `tokenizer` to `path` as GGUF `qtype`.

    Returns the count of tensors per stored type. Call `export_problems` first: this assumes none.
    """
    config = model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(TYPES[qtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer_fields(tokenizer, config.vocab_size))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    counts: dict[str, int] = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ValueError(f"{hf_name}: no GGUF name for this tensor in the Llama layout")
        if gguf_name.endswith("attn_q"):
            tensor = _permuted(tensor, config.num_attention_heads)
        elif gguf_name.endswith("attn_k"):
            tensor = _permuted(tensor, config.num_key_value_heads)
        data, kind = stored(tensor, qtype)
        writer.add_tensor(f"{gguf_name}.{suffix}", data, raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def _add_tokenizer(writer: Any, fields: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    if fields["merges"]:
        writer.add_token_merges(fields["merges"])
    else:
        # gguf cannot write an empty array, and without merges transformers derives them from the scores:
        # equal scores over single-byte tokens derive none, which is the byte tokenizer exactly
        writer.add_token_scores([0.0] * len(fields["tokens"]))
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id)):
        if fields[key] is not None:
            add(fields[key])
    if fields["pad"] is not None:
        writer.add_pad_token_id(fields["pad"])
    if fields["unk"] is not None:
        writer.add_unk_token_id(fields["unk"])
    writer.add_add_bos_token(fields["add_bos"])
    writer.add_add_eos_token(fields["add_eos"])
    writer.add_add_space_prefix(False)
    if fields["chat_template"]:
        writer.add_chat_template(fields["chat_template"])
