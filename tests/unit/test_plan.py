"""`ftkit plan` against published figures: parameter counts, bytes per parameter, QLoRA's
65B-on-48-GB, torchtune's Llama-3.1-8B memory, and the plain transformers + peft stack
measured on an H100 (issue 9). Models are built on the meta device from inline configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftkit.plan import GIB, estimate, memory_warning, sharded_state_bytes
from ftkit.recipe import parse_recipe
from tests.support.helpers import make_recipe, run_cli

GB = 1e9

LLAMA_31_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
)  # fmt: skip
LLAMA_32_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
)  # fmt: skip
#: Llama-shaped, Ψ = 7.548B parameters: the ZeRO paper's worked example is Ψ = 7.5B
ZERO_7B5 = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
)  # fmt: skip
LLAMA_65B = dict(
    hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=64, vocab_size=32000, tie_word_embeddings=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """config.json-only model directories: all `ftkit plan` needs."""
    dirs = {}
    for name, shape in {"8b": LLAMA_31_8B, "1b": LLAMA_32_1B, "65b": LLAMA_65B, "7b5": ZERO_7B5}.items():
        path = tmp_path_factory.mktemp(name)
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5, **shape}
        (path / "config.json").write_text(json.dumps(config))
        dirs[name] = path
    return dirs


def plan_of(model_dir: Path, method: str, *, gpu: str = "h100-80gb", processes: int = 1, **keys):
    """Plan of a recipe: `keys` are `section__key=value` (e.g. train__batch_size=2)."""
    sections = {"model": {"name": str(model_dir)}, "method": {"name": method}, "data": {"train": "x.jsonl"}}
    for dotted, value in keys.items():
        section, key = dotted.split("__")
        sections.setdefault(section, {})[key] = value
    return estimate(parse_recipe(json.dumps(sections)), gpu, processes=processes)


def test_parameter_counts_match_llama_31_8b(model_dirs):
    assert plan_of(model_dirs["8b"], "full").params_total == 8_030_261_248  # Meta's model card: 8.03B
    lora = plan_of(model_dirs["8b"], "lora", method__r=16)
    # PEFT's print_trainable_parameters for r=16 on all linear layers of Llama-3-8B
    assert lora.params_trainable == 41_943_040


def test_mixed_precision_adamw_full_fine_tuning_is_16_bytes_per_param(model_dirs):
    """fp32 weights + fp32 gradients + two fp32 Adam states (ZeRO paper, section 3.1)."""
    plan = plan_of(
        model_dirs["1b"], "full", model__dtype="float32", train__mixed_precision="bf16", train__optimizer="adamw"
    )
    state = plan.memory["weights"] + plan.memory["gradients"] + plan.memory["optimizer"]
    assert state == 16 * plan.params_total


def test_qlora_65b_fits_a_48_gb_gpu(model_dirs):
    """QLoRA (Dettmers et al. 2023): 65B fine-tuned on one 48 GB GPU (r=64 on all linear layers)."""
    plan = plan_of(
        model_dirs["65b"], "qlora", method__r=64, method__dropout=0.05,
        model__gradient_checkpointing=True, data__max_length=512, train__batch_size=1,
        train__optimizer="paged_adamw_8bit", gpu="a6000",
    )  # fmt: skip
    assert 35e9 < plan.peak_bytes < 48e9
    assert plan.fits  # with the ~1 GiB CUDA reserve, on the 48 GB card


def test_8b_4bit_weights_are_5_to_6_gb(model_dirs):
    """7B-class 4-bit weights ≈ 5–6 GB: NF4 linear layers plus the 16-bit 128k-token embedding and head."""
    plan = plan_of(model_dirs["8b"], "qlora")
    base = plan.memory["weights"] - 4 * plan.params_trainable  # without the fp32 adapters
    assert 5e9 <= base <= 6e9


@pytest.mark.parametrize(
    "method, low, high",
    [("qlora", 6.0, 8.0), ("lora", 16.2 * 0.9, 16.2 * 1.1)],
    ids=["qlora-torchtune-7.4GiB", "lora-torchtune-16.2GiB"],
)
def test_8b_at_seq_2048_is_in_torchtunes_range(model_dirs, method, low, high):
    """torchtune, Llama-3.1-8B on an RTX 4090 (checkpointing, chunked loss): QLoRA 7.4 GiB, LoRA 16.2 GiB."""
    plan = plan_of(
        model_dirs["8b"], method, model__gradient_checkpointing=True, data__max_length=2048, train__batch_size=1,
        gpu="4090",
    )  # fmt: skip
    assert low <= plan.peak_bytes / GIB <= high


@pytest.mark.parametrize(
    "batch, checkpointing, measured_gib",
    [(2, True, 23.5), (1, False, 37.0)],
    ids=["mb2-checkpointing-23.5GiB", "mb1-37.0GiB"],
)
def test_plain_stack_lora_8b_within_10_percent_of_h100_measurement(model_dirs, batch, checkpointing, measured_gib):
    """Issue 9's H100 measurements of plain transformers + peft (full logits, LoRA dropout 0.05)."""
    plan = plan_of(
        model_dirs["8b"], "lora", method__r=16, method__dropout=0.05, model__gradient_checkpointing=checkpointing,
        data__max_length=2048, train__batch_size=batch, perf__loss_chunk_size=None,
    )  # fmt: skip
    assert plan.peak_bytes / GIB == pytest.approx(measured_gib, rel=0.10)


def test_chunked_loss_and_checkpointing_lower_the_plan(model_dirs):
    keys = dict(data__max_length=2048, train__batch_size=2)
    full_logits = plan_of(model_dirs["8b"], "lora", perf__loss_chunk_size=None, **keys)
    chunked = plan_of(model_dirs["8b"], "lora", **keys)
    checkpointed = plan_of(model_dirs["8b"], "lora", model__gradient_checkpointing=True, **keys)
    offloaded = plan_of(model_dirs["8b"], "lora", model__gradient_checkpointing="offload", **keys)
    assert chunked.memory["logits"] < full_logits.memory["logits"] / 10
    assert offloaded.memory["activations"] < checkpointed.memory["activations"] < chunked.memory["activations"] / 10


def test_flops_per_token_are_6n_full_and_4n_frozen(model_dirs):
    """Kaplan et al.: 6N per trained token; frozen weights skip the weight gradients (4N)."""
    full = plan_of(model_dirs["1b"], "full", data__max_length=8)  # 8 tokens: attention is negligible
    lora = plan_of(model_dirs["1b"], "lora", data__max_length=8)
    n = 1_235_814_400  # matmul weights: the non-embedding params + the head, which is the tied embedding
    assert full.flops_per_token == pytest.approx(6 * n, rel=0.01)
    # frozen base: 4N; the adapters' own weights (1% of N here) do train: 6 each
    assert lora.flops_per_token == pytest.approx(4 * n + 6 * lora.params_trainable, rel=1e-3)


def test_train_warns_when_the_plan_exceeds_the_gpu(model_dirs):
    recipe = parse_recipe(json.dumps({"model": {"name": str(model_dirs["8b"])}, "method": {"name": "full"},
                                      "data": {"train": "x.jsonl"}}))  # fmt: skip
    warning = memory_warning(recipe, capacity_bytes=24 * GIB, gpu="4090")
    assert warning.startswith("warning: ftkit plan expects") and "method.name: lora or qlora" in warning
    assert memory_warning(recipe, capacity_bytes=4096 * GIB, gpu="h100-80gb") is None


def test_cli_plan_prints_a_table_on_stderr_and_json_on_stdout(tmp_path, tiny_data):
    recipe = make_recipe(tmp_path, tiny_data)
    code, out, err = run_cli("plan", str(recipe), "--gpu", "4090", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["gpu"] == "4090" and plan["params_trainable"] < plan["params_total"]
    assert plan["peak_bytes"] == sum(plan["memory"].values())
    assert "peak" in err and "tokens/s" in err and "{" not in err
    assert plan["steps"] == 20 and plan["wall_s"] > 0  # max_steps 20 in the test recipe
    code, out, err = run_cli("plan", str(recipe), "--gpu", "h800")
    assert (code, out) == (2, "") and err.startswith("error: --gpu: unknown GPU 'h800'")


# --------------------------------------------------------------------------- several GPUs


def test_zero_split_reproduces_the_paper():
    """ZeRO paper, fig. 1: Ψ = 7.5B parameters, K = 12, N = 64 GPUs."""
    psi = 7.5e9
    totals = dict(weights=2 * psi, gradients=2 * psi, optimizer=12 * psi)
    per_gpu = {
        "ddp": sharded_state_bytes(**totals, strategy="ddp", n_gpus=64).gpu,
        1: sharded_state_bytes(**totals, strategy="deepspeed", zero_stage=1, n_gpus=64).gpu,
        2: sharded_state_bytes(**totals, strategy="deepspeed", zero_stage=2, n_gpus=64).gpu,
        3: sharded_state_bytes(**totals, strategy="deepspeed", zero_stage=3, n_gpus=64).gpu,
    }
    assert per_gpu["ddp"] == pytest.approx(120 * GB)
    assert per_gpu[1] == pytest.approx(31.4 * GB, rel=1e-3)
    assert per_gpu[2] == pytest.approx(16.6 * GB, rel=3e-3)
    assert per_gpu[3] == pytest.approx(1.875 * GB)
    fsdp = sharded_state_bytes(**totals, strategy="fsdp", n_gpus=64)
    assert fsdp.gpu == pytest.approx(per_gpu[3])  # full sharding splits like ZeRO-3
    hybrid = sharded_state_bytes(**totals, strategy="fsdp", n_gpus=64, sharding="hybrid", gpus_per_node=8)
    assert hybrid.gpu == pytest.approx(120 * GB / 8)  # shards within a node only


def test_offload_moves_state_to_cpu_and_frozen_weights_split_only_at_stage_3():
    # LoRA-like: 14 GB of frozen 16-bit base, a small adapter with its gradients and Adam state
    lora = dict(weights=14 * GB, gradients=0.08 * GB, optimizer=0.32 * GB)
    stage2 = sharded_state_bytes(**lora, strategy="deepspeed", zero_stage=2, n_gpus=4)
    assert stage2.weights == 14 * GB and stage2.gradients == pytest.approx(0.02 * GB)
    stage3 = sharded_state_bytes(**lora, strategy="deepspeed", zero_stage=3, n_gpus=4)
    assert stage3.weights == pytest.approx(3.5 * GB)
    offloaded = sharded_state_bytes(**lora, strategy="deepspeed", zero_stage=3, n_gpus=4, offload="optimizer")
    assert offloaded.optimizer == 0 and offloaded.cpu == pytest.approx(0.08 * GB)
    params = sharded_state_bytes(**lora, strategy="deepspeed", zero_stage=3, n_gpus=4, offload="params")
    assert params.weights == 0 and params.cpu == pytest.approx((14 + 0.32) * GB / 4)
    fsdp = sharded_state_bytes(**lora, strategy="fsdp", n_gpus=4, offload="params")
    assert fsdp.gpu == 0 and fsdp.cpu == pytest.approx(14.4 * GB / 4)


def state_per_gpu(plan) -> float:
    memory = plan.per_gpu["memory"]
    return memory["weights"] + memory["gradients"] + memory["optimizer"]


def test_zero_stages_per_gpu_reproduce_the_zero_paper(model_dirs):
    """ZeRO paper (Rajbhandari et al. 2020), fig. 1: Ψ = 7.5B, mixed-precision Adam (2Ψ + 2Ψ + 12Ψ),
    N = 64: 120 GB replicated, 31.4 / 16.6 / 1.9 GB per GPU at stages 1 / 2 / 3. The model here has
    Ψ = 7.548B, so the paper's figures are matched to 1 % and the split formula exactly."""
    per_stage = {
        stage: plan_of(
            model_dirs["7b5"], "full", processes=64, distributed__strategy="deepspeed", distributed__zero_stage=stage
        )
        for stage in (1, 2, 3)
    }
    psi = per_stage[1].params_total
    assert psi == pytest.approx(7.5e9, rel=0.01)
    paper_gb = {1: 31.4, 2: 16.6, 3: 1.875}
    exact = {1: (2 + 2 + 12 / 64) * psi, 2: (2 + 14 / 64) * psi, 3: 16 / 64 * psi}
    for stage, plan in per_stage.items():
        assert state_per_gpu(plan) == pytest.approx(exact[stage], abs=64)  # int bytes per part
        assert state_per_gpu(plan) == pytest.approx(paper_gb[stage] * 1e9, rel=0.01)
        assert plan.per_gpu["peak_bytes"] == sum(plan.per_gpu["memory"].values())
    # stage 3 gathers the computed layer and the prefetched one whole: 2 × 2Ψ / layers
    assert per_stage[3].per_gpu["memory"]["gathered"] == pytest.approx(2 * 2 * psi / 36, rel=1e-6)
    assert per_stage[2].per_gpu["memory"]["gathered"] == 0
    # activations are per process (train.batch_size is per process): not split
    assert per_stage[3].per_gpu["memory"]["activations"] == per_stage[3].memory["activations"]


def test_fsdp_and_offload_per_gpu(model_dirs):
    """fsdp full sharding splits the one-GPU state N ways, hybrid only within a node; offload
    moves state to CPU RAM; one process under ddp has no per-GPU column."""
    one = plan_of(model_dirs["8b"], "full", model__dtype="float32", train__optimizer="adamw")
    assert one.per_gpu is None
    state = one.memory["weights"] + one.memory["gradients"] + one.memory["optimizer"]
    fsdp = plan_of(
        model_dirs["8b"], "full", processes=16, model__dtype="float32", train__optimizer="adamw",
        distributed__strategy="fsdp",
    )  # fmt: skip
    assert state_per_gpu(fsdp) == pytest.approx(state / 16, abs=16)
    assert fsdp.per_gpu["peak_bytes"] < one.peak_bytes and fsdp.fits and not one.fits
    recipe = parse_recipe(json.dumps({
        "model": {"name": str(model_dirs["8b"]), "dtype": "float32"}, "method": {"name": "full"},
        "data": {"train": "x.jsonl"}, "train": {"optimizer": "adamw"},
        "distributed": {"strategy": "fsdp", "sharding": "hybrid"},
    }))  # fmt: skip
    hybrid = estimate(recipe, "h100-80gb", processes=16, gpus_per_node=8)
    assert state_per_gpu(hybrid) == pytest.approx(state / 8, abs=16)
    offloaded = plan_of(
        model_dirs["8b"], "full", processes=8, distributed__strategy="deepspeed", distributed__zero_stage=3,
        distributed__offload="params",
    )  # fmt: skip
    memory = offloaded.per_gpu["memory"]
    assert memory["weights"] == memory["optimizer"] == 0
    # what left the GPU is in CPU RAM: 2Ψ 16-bit weights + 12Ψ optimizer state, split 8 ways
    assert offloaded.per_gpu["cpu_offload_bytes"] == pytest.approx(14 * offloaded.params_total / 8, abs=16)


def test_cli_plan_prints_per_gpu_beside_one_gpu(tmp_path, tiny_data):
    recipe = make_recipe(tmp_path, tiny_data, distributed={"strategy": "deepspeed", "zero_stage": 3})
    code, out, err = run_cli("plan", str(recipe), "--gpus", "4", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["processes"] == 4 and plan["per_gpu"]["strategy"] == "deepspeed ZeRO-3"
    assert "one GPU" in err and "per GPU" in err and "(4 × deepspeed ZeRO-3)" in err
    assert plan["per_gpu"]["memory"]["optimizer"] < plan["memory"]["optimizer"]


@pytest.mark.parametrize(
    ("method", "keys", "expected"),
    [
        # per site 2·4096·256 + 256 + 4096 (reduction 16: bottleneck 256), 2 sites (houlsby) or 1 × 32 layers
        ("adapter", {"method__config": "houlsby"}, 2 * 32 * (2 * 4096 * 256 + 256 + 4096)),
        ("adapter", {"method__config": "pfeiffer"}, 32 * (2 * 4096 * 256 + 256 + 4096)),
        # peft's adaption prompt (10 × 4096) and its gate, in the top 30 layers
        ("llama_adapter", {}, 30 * (10 * 4096 + 1)),
    ],
)
def test_parameter_counts_of_the_adapter_methods_on_llama_31_8b(model_dirs, method, keys, expected):
    assert plan_of(model_dirs["8b"], method, **keys).params_trainable == expected
