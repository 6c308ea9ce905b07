"""hf_files, the one reader and writer of HF / peft files: what it writes loads with the real
libraries (PeftModel, AutoModelForCausalLM, AutoConfig, GenerationConfig) and means what was written."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from ftkit.errors import ModelError
from ftkit.models import hf_files
from ftkit.models.builtin import materialize_builtin

PROBE = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return materialize_builtin("builtin:micro-llama", tmp_path_factory.mktemp("hf") / "base", seed=0)


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def trained_lora(base: Path, out: Path) -> torch.Tensor:
    """A LoRA adapter with non-zero B, a rank pattern and a head trained whole, saved by peft in `out`;
    returns its logits on PROBE."""
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(load(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(out)
    return logits(model.eval())


def test_folder_predicates(base, tmp_path):
    trained_lora(base, tmp_path / "adapter")
    assert hf_files.is_model_dir(base) and not hf_files.is_adapter_dir(base) and hf_files.has_tokenizer(base)
    assert hf_files.is_adapter_dir(tmp_path / "adapter") and hf_files.has_adapter_config(tmp_path / "adapter")
    assert hf_files.has_weights(base) and hf_files.has_weights(tmp_path / "adapter")
    assert not hf_files.has_weights(tmp_path) and not hf_files.is_model_dir(tmp_path)


def test_adapter_config_reads_peft_s_own_class(base, tmp_path):
    adapter = tmp_path / "adapter"
    trained_lora(base, adapter)
    config = hf_files.adapter_config(adapter)
    assert isinstance(config, LoraConfig) and config.rank_pattern == {"v_proj": 2}
    assert hf_files.peft_type(config) == "LORA"  # the value, not `PeftType.LORA`
    assert hf_files.adapter_task_type(adapter) == "CAUSAL_LM"
    assert hf_files.adapter_rank(adapter) == 4
    assert hf_files.adapter_base(adapter) == str(base)


def test_a_missing_or_broken_adapter_config_is_a_model_error(tmp_path):
    # a bare name must not be taken for a hub id: no download is tried
    with pytest.raises(ModelError, match="no adapter_config.json"):
        hf_files.adapter_config(tmp_path)
    (tmp_path / hf_files.ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(ModelError, match="cannot read it"):
        hf_files.adapter_config(tmp_path)


def test_pointing_an_adapter_elsewhere_keeps_its_meaning(base, tmp_path):
    """peft rewrites the config: every key written before is there with the same value, the base
    changes, and the real PeftModel.from_pretrained loads the same model."""
    adapter = tmp_path / "adapter"
    expected = trained_lora(base, adapter)
    before = json.loads((adapter / hf_files.ADAPTER_CONFIG).read_text())
    hf_files.point_adapter_to(adapter, "somewhere/else")
    after = json.loads((adapter / hf_files.ADAPTER_CONFIG).read_text())
    assert after.pop("base_model_name_or_path") == "somewhere/else"
    before.pop("base_model_name_or_path")
    as_sets = {"target_modules", "modules_to_save"}  # peft keeps these as sets: their order is not meaning
    assert {k: v for k, v in after.items() if k not in as_sets} == {k: v for k, v in before.items() if k not in as_sets}
    assert all(set(after[k]) == set(before[k]) for k in as_sets)
    loaded = PeftModel.from_pretrained(load(base), adapter).eval()
    assert (logits(loaded) - expected).abs().max() <= 1e-6


PEFT_CONFIGS = {
    "dora": lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
    "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "o_proj"]),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "loha": lambda: peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "lokr": lambda: peft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "prompt_tuning": lambda: peft.PromptTuningConfig(num_virtual_tokens=4),
    "prefix_tuning": lambda: peft.PrefixTuningConfig(num_virtual_tokens=4),
    "p_tuning": lambda: peft.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=32),
}


@pytest.mark.parametrize("kind", PEFT_CONFIGS)
def test_every_peft_type_ftkit_trains_keeps_its_config_through_a_rewrite(base, tmp_path, kind):
    """What point_adapter_to writes for each adapter family ftkit trains: the same keys and values,
    and the same model from PeftModel.from_pretrained."""
    config = PEFT_CONFIGS[kind]()
    config.task_type = "CAUSAL_LM"
    get_peft_model(load(base), config).save_pretrained(tmp_path / "adapter")
    before = json.loads((tmp_path / "adapter" / hf_files.ADAPTER_CONFIG).read_text())
    expected = logits(PeftModel.from_pretrained(load(base), tmp_path / "adapter").eval())
    hf_files.point_adapter_to(tmp_path / "adapter", str(base))
    after = json.loads((tmp_path / "adapter" / hf_files.ADAPTER_CONFIG).read_text())
    assert after.pop("base_model_name_or_path") == str(base)
    before.pop("base_model_name_or_path")
    assert after.keys() == before.keys()
    assert all(sorted(after[k]) == sorted(before[k]) if isinstance(after[k], list) else after[k] == before[k]
               for k in after)  # fmt: skip
    assert hf_files.peft_type(hf_files.adapter_config(tmp_path / "adapter")) == before["peft_type"]
    loaded = PeftModel.from_pretrained(load(base), tmp_path / "adapter").eval()
    assert torch.equal(logits(loaded), expected)


def test_adapter_weights_are_replaced_in_peft_s_layout(base, tmp_path):
    adapter = tmp_path / "adapter"
    trained_lora(base, adapter)
    weights = hf_files.load_tensors(adapter)
    hf_files.save_adapter_weights(adapter, {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()})
    loaded = PeftModel.from_pretrained(load(base), adapter).eval()
    # B = 0: the LoRA pairs add nothing; only the head trained whole (copied unchanged) is left
    head = {k.removeprefix("base_model.model."): v for k, v in weights.items() if "lm_head" in k}
    plain = load(base)
    plain.lm_head.weight.data.copy_(next(iter(head.values())))
    assert (logits(loaded) - logits(plain)).abs().max() <= 1e-6


def test_copied_model_config_loads_as_the_source_with_the_changes(base, tmp_path):
    config = AutoConfig.from_pretrained(base)
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    config.save_pretrained(tmp_path / "quantized")
    GenerationConfig.from_pretrained(base).save_pretrained(tmp_path / "quantized")

    hf_files.copy_model_config(tmp_path / "quantized", tmp_path / "out", "bfloat16", num_hidden_layers=3)
    source, copied = AutoConfig.from_pretrained(base).to_dict(), AutoConfig.from_pretrained(tmp_path / "out").to_dict()
    assert "quantization_config" not in copied  # the weights written beside it are plain
    assert copied.pop("dtype") == "bfloat16" and copied.pop("num_hidden_layers") == 3
    for key in ("dtype", "num_hidden_layers", "_name_or_path"):
        source.pop(key)
    copied.pop("_name_or_path")
    assert copied == source
    generation = GenerationConfig.from_pretrained(tmp_path / "out")
    assert generation.to_dict() == GenerationConfig.from_pretrained(base).to_dict()


def test_architectures_and_labels(base, tmp_path):
    assert hf_files.architectures(base) == ["LlamaForCausalLM"]
    assert not hf_files.is_classifier_architecture(hf_files.architectures(base))
    assert hf_files.is_classifier_architecture(["LlamaForSequenceClassification"])
    assert hf_files.config_labels(base) is None
    assert hf_files.config_labels(tmp_path) is None  # no config.json at all
    classifier = materialize_builtin("builtin:micro-llama", tmp_path / "clf", seed=0, labels=["neg", "pos", "mixed"])
    assert hf_files.config_labels(classifier) == ["neg", "pos", "mixed"]


def test_sharded_writes_stream_and_load_back(base, tmp_path):
    """split_torch_state_dict_into_shards plans from meta tensors; each shard is on disk as soon as its
    last tensor came, before the next tensor is even produced; transformers loads the result."""
    reader = hf_files.Weights(base)
    layout = {name: reader.meta(name) for name in reader.names}
    assert all(t.device.type == "meta" for t in layout.values())
    out = tmp_path / "sharded"
    on_disk_when_asked = []

    def tensors():
        for name in reader.names:
            on_disk_when_asked.append(len(list(out.glob("model-*.safetensors"))))
            yield name, reader.get(name)

    files = hf_files.save_sharded(layout, out, max_shard_size=40_000, tensors=tensors())
    index = json.loads((out / hf_files.WEIGHTS_INDEX).read_text())
    assert len(files) > 2 and sorted(f.name for f in files) == sorted(set(index["weight_map"].values()))
    # before tensor i is produced, every shard whose tensors all come earlier has been written
    order = {name: i for i, name in enumerate(reader.names)}
    last_of = {}
    for name, file in index["weight_map"].items():
        last_of[file] = max(last_of.get(file, -1), order[name])
    assert on_disk_when_asked == [sum(last < i for last in last_of.values()) for i in range(len(reader.names))]
    # a shard holds ≤ max_shard_size bytes of tensors (+ its header), or one tensor larger than that
    per_file = {f.name: [n for n, file in index["weight_map"].items() if file == f.name] for f in files}
    assert all(f.stat().st_size <= 40_000 + 2_000 or len(per_file[f.name]) == 1 for f in files)
    hf_files.copy_model_config(base, out)
    assert (logits(load(out)) - logits(load(base))).abs().max() == 0
    assert hf_files.weight_files(out) == files and set(hf_files.tensor_names(out)) == set(reader.names)


def test_one_shard_is_model_safetensors_without_index(base, tmp_path):
    state = hf_files.load_tensors(base)
    files = hf_files.save_sharded(state, tmp_path)
    assert files == [tmp_path / hf_files.WEIGHTS] and not (tmp_path / hf_files.WEIGHTS_INDEX).exists()
    saved = load_file(tmp_path / hf_files.WEIGHTS)
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)


def test_a_tensor_that_never_comes_is_an_error(base, tmp_path):
    reader = hf_files.Weights(base)
    layout = {name: reader.meta(name) for name in reader.names}
    with pytest.raises(ValueError, match="never came"):
        hf_files.save_sharded(layout, tmp_path, tensors=[(reader.names[0], reader.get(reader.names[0]))])


def test_weights_read_by_name_and_architectures_compared(base, tmp_path):
    reader = hf_files.Weights(base, "models[0]")
    state = hf_files.load_tensors(base)
    assert reader.names == list(state) and reader.config.model_type == "llama"
    name = "model.layers.0.mlp.up_proj.weight"
    assert reader.shape(name) == tuple(state[name].shape) and torch.equal(reader.get(name), state[name])
    assert reader.meta(name).dtype == state[name].dtype
    hf_files.check_same_architecture(reader, hf_files.Weights(base, "base"))

    wider = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k == name else v for k, v in state.items()}
    hf_files.save_sharded(wider, tmp_path)
    hf_files.copy_model_config(base, tmp_path)
    with pytest.raises(ModelError, match=r"models\[1\]: the architectures differ: .*up_proj.* has shape"):
        hf_files.check_same_architecture(reader, hf_files.Weights(tmp_path, "models[1]"))
    hf_files.check_same_architecture(reader, hf_files.Weights(tmp_path), layers_only=True)
    with pytest.raises(ModelError, match="no safetensors weights"):
        hf_files.Weights(tmp_path / "nowhere")
