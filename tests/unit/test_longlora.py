"""LongLoRA: S²-Attn against hand-written masks and full attention, masks (padding, packing), the
train/eval switch, what trains, position interpolation, and the checks made before weights load."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from ftkit.methods import get_method
from ftkit.methods.longlora import register_attention, shifted_sparse_attention
from ftkit.recipe.methods import LongloraConfig

TRAINING = SimpleNamespace(training=True, num_key_value_groups=2, is_causal=True)


def qkv(batch: int = 2, heads: int = 4, kv_heads: int = 2, length: int = 6, dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = lambda h: (batch, h, length, dim)  # noqa: E731
    return (torch.randn(*shape(n), generator=gen, dtype=torch.float64) for n in (heads, kv_heads, kv_heads))


def masked_attention(q, k, v, allowed):
    """softmax(q kᵀ / √d + log allowed) v, head by head, written out: the reference."""
    k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (B, T, H, D), the AttentionInterface layout


def test_group_at_least_the_row_is_full_causal_attention():
    q, k, v = qkv(length=7)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    for group_size in (8, 16):
        out, _ = shifted_sparse_attention(TRAINING, q, k, v, None, group_size=group_size)
        assert torch.allclose(out, masked_attention(q, k, v, causal), atol=1e-12)
    # a padding mask as sdpa_mask builds it (row 1: last 2 positions are padding)
    keys = torch.tensor([[1] * 7, [1] * 5 + [0] * 2], dtype=torch.bool)
    mask = (causal[None] & keys[:, None, :])[:, None]
    out, _ = shifted_sparse_attention(TRAINING, q, k, v, mask, group_size=8)
    assert torch.allclose(out[1, :5], masked_attention(q, k, v, mask)[1, :5], atol=1e-12)


def test_groups_and_shift_follow_the_hand_written_pattern():
    """T = 6, G = 4: heads 0-1 attend within [0, 4) and [4, 6); heads 2-3 (shifted by G/2 = 2)
    within [0, 2) and [2, 6). Both patterns written out, 1 = may attend."""
    plain = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ]
    shifted = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1],
    ]
    allowed = torch.tensor([plain, plain, shifted, shifted], dtype=torch.bool)[None]
    q, k, v = qkv(length=6)
    out, _ = shifted_sparse_attention(TRAINING, q, k, v, None, group_size=4)
    assert torch.allclose(out, masked_attention(q, k, v, allowed), atol=1e-12)
    # the shift matters: without it heads 2-3 would equal the plain pattern
    plain_only = torch.tensor([plain] * 4, dtype=torch.bool)[None]
    assert not torch.allclose(out[:, :, 2:], masked_attention(q, k, v, plain_only)[:, :, 2:], atol=1e-3)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 3)], ids=["kv-per-half", "kv-shared-by-halves"])
def test_rows_not_a_multiple_of_the_group_match_the_definition(heads, kv_heads):
    """Position p of an unshifted head is in group ⌊p/G⌋, of a shifted one ⌊(p + G/2)/G⌋; causal inside.
    With 6 heads on 3 KV heads, KV head 1 serves query heads 2 (plain) and 3 (shifted)."""
    length, group = 23, 6
    p = torch.arange(length)
    causal = p[None, :] <= p[:, None]
    same = lambda s: ((p[:, None] + s) // group) == ((p[None, :] + s) // group)  # noqa: E731
    half = heads // 2
    allowed = torch.stack([causal & same(0)] * half + [causal & same(group // 2)] * (heads - half))[None]
    q, k, v = qkv(heads=heads, kv_heads=kv_heads, length=length)
    module = SimpleNamespace(training=True, num_key_value_groups=heads // kv_heads, is_causal=True)
    out, _ = shifted_sparse_attention(module, q, k, v, None, group_size=group)
    assert torch.allclose(out, masked_attention(q, k, v, allowed), atol=1e-12)
    # the masked path (a padding or packing mask from sdpa_mask) on a mask that is plain causal
    masked, _ = shifted_sparse_attention(module, q, k, v, causal[None, None].expand(2, 1, -1, -1), group_size=group)
    assert torch.allclose(masked, out, atol=1e-12)


def test_eval_mode_is_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = (x.float() for x in qkv(length=12))
    module = SimpleNamespace(training=False, num_key_value_groups=2, is_causal=True)
    out, _ = shifted_sparse_attention(module, q, k, v, None, group_size=4)
    assert torch.equal(out, sdpa_attention_forward(module, q, k, v, None)[0])


# --- in a model: masks from transformers, the train/eval switch ------------------------------------


@pytest.fixture(scope="module")
def s2_model():
    """micro-llama (4 heads, 2 KV heads) in fp64, with S²-Attn for G = 8."""
    from transformers import LlamaForCausalLM

    from ftkit.models.builtin import builtin_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(builtin_config("builtin:micro-llama")).double()
    model.set_attn_implementation(register_attention(8))
    return model


def logits(model, training: bool, **inputs):
    model.train(training)
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def test_train_forward_is_s2_and_eval_forward_is_full_attention(s2_model):
    from transformers import LlamaForCausalLM

    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(1))
    full = LlamaForCausalLM(s2_model.config.__class__(**s2_model.config.to_dict())).double()
    full.load_state_dict(s2_model.state_dict())
    full.set_attn_implementation("sdpa")
    reference = logits(full, False, input_ids=ids)
    assert torch.allclose(logits(s2_model, False, input_ids=ids), reference, atol=1e-10)
    trained = logits(s2_model, True, input_ids=ids)
    assert torch.allclose(trained[:, :4], reference[:, :4], atol=1e-10)  # inside the first group of every head
    assert (trained[:, 8:] - reference[:, 8:]).abs().max() > 1e-4  # past G/2 + G the groups cut attention
    short = ids[:, :8]  # a row of at most G tokens: one group, full attention
    assert torch.allclose(logits(s2_model, True, input_ids=short), reference[:, :8], atol=1e-10)


def test_padding_inside_groups_is_masked(s2_model):
    """A right-padded row gives the logits of the same row alone at its real positions."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 200, (2, 21), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    batched = logits(s2_model, True, input_ids=ids, attention_mask=mask)
    alone = logits(s2_model, True, input_ids=ids[1:, :13])
    assert torch.allclose(batched[1, :13], alone[0], atol=1e-10)


def test_packed_rows_keep_each_example_apart(s2_model):
    """Packed examples whose lengths are multiples of G sit on the same group grid as alone, so a
    packed row (position_ids restart, no attention mask) equals its examples run one by one."""
    gen = torch.Generator().manual_seed(3)
    first, second = torch.randint(0, 200, (1, 16), generator=gen), torch.randint(0, 200, (1, 24), generator=gen)
    packed_ids = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(16), torch.arange(24)])[None]
    packed = logits(s2_model, True, input_ids=packed_ids, position_ids=positions)
    assert torch.allclose(packed[:, :16], logits(s2_model, True, input_ids=first), atol=1e-10)
    assert torch.allclose(packed[:, 16:], logits(s2_model, True, input_ids=second), atol=1e-10)


# --- what trains ----------------------------------------------------------------------------------------


def micro_llama(**config):
    from transformers import LlamaForCausalLM

    from ftkit.models.builtin import builtin_config

    torch.manual_seed(0)
    cfg = builtin_config("builtin:micro-llama")
    for key, value in config.items():
        setattr(cfg, key, value)
    return LlamaForCausalLM(cfg)


def test_lora_on_attention_plus_embeddings_and_norms_train():
    model = get_method("longlora").apply(micro_llama(), LongloraConfig(r=4), None)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    adapted = {name.split(".")[-4] for name in trained if ".lora_" in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    full = {name.split(".modules_to_save")[0].split(".")[-1] for name in trained if "modules_to_save" in name}
    assert full == {"embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"}
    assert not any("mlp" in name or "lm_head" in name for name in trained)
    plain = get_method("longlora").apply(micro_llama(), LongloraConfig(r=4, trainable_norms=False), None)
    assert not any("norm" in n for n, p in plain.named_parameters() if p.requires_grad)


def test_tied_embeddings_stay_tied_to_the_trained_copy():
    model = get_method("longlora").apply(micro_llama(tie_word_embeddings=True), LongloraConfig(r=4), None)
    with torch.no_grad():
        model.get_input_embeddings().modules_to_save["default"].weight.add_(1.0)
    merged = model.merge_and_unload()
    assert torch.equal(merged.get_input_embeddings().weight, merged.get_output_embeddings().weight)


# --- before the weights load: model problems, position interpolation --------------------------------


def test_non_rotary_model_is_refused_in_one_line():
    from transformers import GPT2Config

    from ftkit.models.builtin import builtin_config

    (problem,) = get_method("longlora").model_problems(LongloraConfig(), GPT2Config(n_layer=1))
    assert problem.startswith("method.name: longlora") and "rotary" in problem and "gpt2" in problem
    assert get_method("longlora").model_problems(LongloraConfig(), builtin_config("builtin:micro-llama")) == []
    llama3 = builtin_config("builtin:micro-llama")
    llama3.rope_parameters = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}
    assert get_method("longlora").model_problems(LongloraConfig(), llama3) == []
    (problem,) = get_method("longlora").model_problems(LongloraConfig(rope_scaling_factor=2), llama3)
    assert problem.startswith("method.rope_scaling_factor:") and "llama3" in problem


def test_position_interpolation_is_set_before_loading_and_kept_in_base(tmp_path):
    """A local base is copied into base/ with the linear-RoPE config; a built-in one, already
    materialised there, only gets its config.json rewritten. Reloading base/ gives the same model."""
    from transformers import AutoModelForCausalLM

    from ftkit.models.load import build_model
    from ftkit.recipe.schema import ModelSection

    changes = get_method("longlora").model_config_changes(LongloraConfig(rope_scaling_factor=4.0), micro_llama().config)
    assert changes == {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}
    source = tmp_path / "source"
    build_model(ModelSection(name="builtin:micro-llama"), "cpu", 0, base_dir=source)
    model, _, base = build_model(ModelSection(name=str(source)), "cpu", 0, tmp_path / "base", config_changes=changes)
    assert base == str((tmp_path / "base").resolve()) and (tmp_path / "base" / "model.safetensors").is_file()
    assert json.loads((source / "config.json").read_text())["rope_parameters"]["rope_type"] == "default"
    unscaled = AutoModelForCausalLM.from_pretrained(source).model.rotary_emb.inv_freq
    assert torch.allclose(model.model.rotary_emb.inv_freq, unscaled / 4)
    reloaded = AutoModelForCausalLM.from_pretrained(base)
    ids = torch.arange(40)[None]
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model.eval()(ids).logits, atol=1e-6)
    _, _, builtin_base = build_model(
        ModelSection(name="builtin:micro-llama"), "cpu", 0, tmp_path / "b", config_changes=changes
    )
    assert json.loads((tmp_path / "b" / "config.json").read_text())["rope_parameters"]["factor"] == 4.0
    assert builtin_base == str((tmp_path / "b").resolve())
