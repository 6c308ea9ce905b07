"""Bottleneck adapters and AdapterFusion (ftkit.models.bottleneck, ftkit.methods.bottleneck): the model
starts at the base, what trains, fp32 adapters on a 16-bit base, the fusion's start, and the layouts refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaForCausalLM

from ftkit.errors import ModelError
from ftkit.methods import RunInfo, get_method
from ftkit.models import bottleneck as bn
from ftkit.models.builtin import builtin_config
from ftkit.recipe.methods import AdapterConfig


def micro(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(builtin_config("builtin:micro-llama")).to(dtype).eval()


IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("config", ["houlsby", "pfeiffer"])
def test_step_zero_is_the_base_and_only_adapters_train(config):
    model = micro()
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    adapted = get_method("adapter").apply(model, AdapterConfig(config=config, reduction_factor=4), RunInfo())
    with torch.no_grad():
        after = adapted(input_ids=IDS).logits
    assert (after - before).abs().max() <= 1e-6
    trained = [name for name, p in adapted.named_parameters() if p.requires_grad]
    layers = len(adapted.model.layers)
    sites = {"houlsby": 2, "pfeiffer": 1}[config]
    assert len(trained) == 4 * sites * layers  # down/up weight and bias per site
    assert all(".bottleneck." in name for name in trained)
    assert all(("self_attn.bottleneck" in name) == (config == "houlsby") for name in trained if "self_attn" in name)
    hidden = adapted.config.hidden_size
    width = hidden // 4
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == sites * layers * (
        2 * hidden * width + width + hidden
    )


def test_a_trained_adapter_changes_the_output_and_disabling_restores_the_base():
    model = micro()
    with torch.no_grad():
        base = model(input_ids=IDS).logits
    get_method("adapter").apply(model, AdapterConfig(config="houlsby", reduction_factor=4), RunInfo())
    with torch.no_grad():
        for site in bn.adapter_modules(model):
            site.up.weight.normal_(std=0.5)
        moved = model(input_ids=IDS).logits
        with bn.disabled(model):
            restored = model(input_ids=IDS).logits
    assert (moved - base).abs().max() > 1e-3
    assert torch.equal(restored, base)


def test_adapters_stay_fp32_on_a_bf16_base_and_cast_back():
    model = micro(torch.bfloat16)
    get_method("adapter").apply(model, AdapterConfig(config="pfeiffer"), RunInfo())
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_modules_to_save_train_in_full():
    model = get_method("adapter").apply(micro(), AdapterConfig(modules_to_save=["lm_head"]), RunInfo())
    assert model.lm_head.weight.requires_grad
    assert bn.trained_state(model, ["lm_head"]).keys() >= {"lm_head.weight"}


def test_save_and_attach_round_trip(tmp_path):
    model = micro()
    config = AdapterConfig(config="houlsby", reduction_factor=4, non_linearity="swish")
    get_method("adapter").apply(model, config, RunInfo())
    with torch.no_grad():
        for site in bn.adapter_modules(model):
            site.up.weight.normal_(std=0.3)
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)  # the method's writer: the adapters only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bottleneck_config.json", "bottleneck_model.safetensors"]
    loaded = bn.attach(micro(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, expected)


def test_fusion_starts_at_the_mean_of_its_adapters():
    """Q = 0 gives uniform weights and V = I, so h' = h + mean_i f_i(h) at step 0."""
    torch.manual_seed(0)
    hidden = 16
    fused = bn.FusedAdapters(hidden, [{"reduction_factor": 4, "non_linearity": "relu"}] * 3)
    for adapter in fused.adapters:
        torch.nn.init.normal_(adapter.up.weight)
    h = torch.randn(2, 5, hidden)
    mean = torch.stack([a(h) for a in fused.adapters]).mean(0)
    fused.fusion.record = True
    assert torch.allclose(fused(h), mean, atol=1e-6)
    assert torch.allclose(fused.fusion.weight_sum / fused.fusion.tokens, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_a_layout_without_decoder_layers_is_refused_naming_the_module():
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    (problem,) = get_method("adapter").run_problems(AdapterConfig(), skeleton, RunInfo())
    assert problem.startswith("method.name: adapter wraps each decoder layer's mlp; GPT2LMHeadModel has no ")
    assert "\n" not in problem
    with pytest.raises(ModelError, match="has no"):
        get_method("adapter").apply(AutoModelForCausalLM.from_config(config), AdapterConfig(), RunInfo())


def test_a_layer_without_self_attn_is_refused_for_houlsby_only():
    model = micro()
    for layer in model.model.layers:
        layer.attention = layer.self_attn
        del layer.self_attn
    (problem,) = get_method("adapter").run_problems(AdapterConfig(config="houlsby"), model, RunInfo())
    assert "has no model.layers[i].self_attn" in problem
    assert get_method("adapter").run_problems(AdapterConfig(config="pfeiffer"), model, RunInfo()) == []


def test_a_checkpoint_is_sized_as_the_adapters_only():
    from ftkit.train.checkpoint import estimate_checkpoint_bytes

    model = get_method("adapter").apply(micro(), AdapterConfig(), RunInfo())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate_checkpoint_bytes(model, "adamw") == 3 * 4 * trained  # fp32 weights and two moments


@pytest.mark.parametrize("method", ["adapter", "adapter_fusion"])
def test_a_sharding_strategy_is_refused_naming_the_key(method):
    from ftkit.errors import RecipeError
    from ftkit.recipe import parse_recipe

    section = "{name: adapter}" if method == "adapter" else "{name: adapter_fusion, adapters: [a, b]}"
    with pytest.raises(RecipeError) as caught:
        parse_recipe(f"method: {section}\ndata: {{train: d.jsonl}}\ndistributed: {{strategy: fsdp}}\n")
    (problem,) = caught.value.problems
    assert "distributed.strategy: method " in problem and "use distributed.strategy: ddp" in problem


def test_a_classifier_s_new_head_trains_and_is_saved(tmp_path):
    from transformers import LlamaForSequenceClassification

    config = builtin_config("builtin:micro-llama")
    config.num_labels = 3
    model = get_method("adapter").apply(LlamaForSequenceClassification(config), AdapterConfig(), RunInfo())
    assert model.score.weight.requires_grad
    model.save_pretrained(tmp_path)
    assert bn.read_config(tmp_path)["modules_to_save"] == ["score"]
    assert "score.weight" in bn.load_file(str(tmp_path / "bottleneck_model.safetensors"))
