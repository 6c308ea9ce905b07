"""The single-process side of `ftkit.distributed`: data slices, engine configs generated from
the recipe, recipe rules and launcher plumbing. The multi-process runs themselves are in
tests/e2e/test_distributed.py; the ZeRO memory split (`ftkit plan`) in tests/unit/test_plan.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftkit.data import Example, batch_order
from ftkit.distributed import DistributedError, collectives, engines, launch, state
from ftkit.errors import RecipeError
from ftkit.recipe import dump_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]
BASE = "method: {name: lora}\ndata: {train: t.jsonl}\n"


def recipe(text: str = "", *overrides: str):
    return parse_recipe(BASE + text, "recipe.yaml", overrides)


# --------------------------------------------------------------------------- data slices


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_rank_slices_partition_the_global_batch(n, world):
    indices = list(range(100, 100 + n))
    parts = [collectives.rank_slice(indices, r, world) for r in range(world)]
    assert sum(parts, []) == indices  # in order: nothing dropped, nothing repeated
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_two_ranks_see_the_batches_of_one_process_with_twice_the_batch_size():
    """1 process × batch_size 4 and 2 processes × batch_size 2 consume the same examples per micro-step."""
    lengths = [(7 * i) % 23 + 5 for i in range(37)]
    for epoch in range(3):
        one = batch_order(lengths, 4, seed=3, epoch=epoch)
        global_batches = batch_order(lengths, 2 * 2, seed=3, epoch=epoch)
        for single, batch in zip(one, global_batches, strict=True):
            parts = [collectives.rank_slice(batch, r, 2) for r in range(2)]
            assert sorted(parts[0] + parts[1]) == sorted(single)


def test_an_empty_slice_runs_an_example_with_weight_zero():
    examples = [Example([1, 5, 6, 7], [-100, 5, 6, 7], "a:1"), Example([1, 8, 9], [-100, 8, 9], "a:2")]
    # one example for two processes: process 1 has it, process 0 runs it too with weight 0
    assert collectives.rank_examples(examples, [1], rank=0, world=2) == ([examples[1]], 0.0)
    assert collectives.rank_examples(examples, [1], rank=1, world=2) == ([examples[1]], 1.0)
    assert collectives.rank_examples(examples, [0, 1], rank=0, world=1) == (examples, 1.0)


# --------------------------------------------------------------------------- DeepSpeed config


@pytest.mark.parametrize(
    ("stage", "offload", "precision"),
    [(1, "none", "bf16"), (2, "optimizer", "bf16"), (3, "optimizer", "fp16"), (3, "params", "no")],
)
def test_deepspeed_config_comes_from_the_recipe(stage, offload, precision):
    r = recipe(
        "train: {batch_size: 3, grad_accum: 5, max_grad_norm: 0.5}\n"
        f"distributed: {{strategy: deepspeed, zero_stage: {stage}, offload: {offload}}}\n"
    )
    config = engines.deepspeed_config(r, world=4, mixed_precision=precision)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5
    assert config["train_batch_size"] == 3 * 5 * 4  # DeepSpeed asserts micro × accumulation × processes
    assert config["gradient_clipping"] == 0.5
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == (offload != "none")
    assert ("offload_param" in zero) == (offload == "params")
    assert config["bf16"]["enabled"] == (precision == "bf16") and config["fp16"]["enabled"] == (precision == "fp16")
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
    assert config["zero_force_ds_cpu_optimizer"] is False  # offload steps the recipe's torch AdamW

    # accelerate reads the same values back (no DeepSpeed install needed to build the plugin)
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=config)
    assert plugin.zero_stage == stage
    assert plugin.gradient_accumulation_steps == 5
    assert plugin.offload_optimizer_device == ("none" if offload == "none" else "cpu")
    assert plugin.offload_param_device == ("cpu" if offload == "params" else "none")


def test_a_given_deepspeed_file_keeps_its_settings_and_may_not_contradict_the_recipe(tmp_path):
    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"overlap_comm": True}}))
    r = recipe(f"distributed: {{strategy: deepspeed, deepspeed_config: {file}}}\n")
    config = engines.deepspeed_config(r, world=2, mixed_precision="bf16")
    assert config["zero_optimization"] == {"overlap_comm": True, "stage": 2}
    assert config["train_micro_batch_size_per_gpu"] == r.train.batch_size  # "auto" filled from the recipe

    file.write_text(json.dumps({"gradient_accumulation_steps": 16, "zero_optimization": {"stage": 3}}))
    with pytest.raises(DistributedError) as err:
        engines.deepspeed_config(r, world=2, mixed_precision="bf16")
    message = str(err.value)
    assert str(file) in message and "gradient_accumulation_steps is 16" in message
    assert "zero_optimization.stage is 3" in message


# --------------------------------------------------------------------------- FSDP plugin


@pytest.mark.parametrize("offload", ["none", "params"])
def test_fsdp_plugin_comes_from_the_recipe(offload):
    from torch.distributed.fsdp import CPUOffloadPolicy, StateDictType
    from transformers import LlamaConfig, LlamaForCausalLM

    r = recipe(f"distributed: {{strategy: fsdp, offload: {offload}}}\n")
    plugin = engines.fsdp_plugin(r)
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # full sharding
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) == (offload == "params")
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    shape = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = LlamaConfig(vocab_size=32, **shape)
    model = LlamaForCausalLM(config)
    plugin.set_auto_wrap_policy(model)
    assert {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]} == {"LlamaDecoderLayer"}


# --------------------------------------------------------------------------- recipe rules


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("distributed: {strategy: ddp, zero_stage: 3}\n", "distributed.zero_stage"),
        ("distributed: {strategy: ddp, offload: optimizer}\n", "distributed.offload"),
        ("distributed: {strategy: fsdp, offload: optimizer}\n", "distributed.offload"),
        ("distributed: {strategy: deepspeed, zero_stage: 2, offload: params}\n", "distributed.offload"),
        ("distributed: {strategy: deepspeed, sharding: hybrid}\n", "distributed.sharding"),
        ("distributed: {strategy: fsdp, deepspeed_config: ds.json}\n", "distributed.deepspeed_config"),
        ("train: {optimizer: adamw_8bit}\ndistributed: {strategy: fsdp}\n", "train.optimizer"),
        ("objective: {name: dpo}\ndistributed: {strategy: fsdp}\n", "objective.reference"),
        ("train: {on_nonfinite: skip}\ndistributed: {strategy: deepspeed}\n", "train.on_nonfinite"),
    ],
)
def test_keys_that_do_not_fit_the_strategy_are_named(text, key):
    with pytest.raises(RecipeError) as err:
        recipe(text, "method.name=full", "data.format=preference") if "dpo" in text else recipe(text)
    (problem,) = err.value.problems
    assert problem.startswith("recipe.yaml:") and f": {key}:" in problem


def test_resolved_recipe_with_distributed_reloads_equal():
    r = recipe("distributed: {strategy: deepspeed, zero_stage: 3, offload: params}\n")
    again = parse_recipe(dump_recipe(r), "resolved.yaml")
    assert again.model_dump() == r.model_dump()
    assert again.distributed.offload == "params"


# --------------------------------------------------------------------------- launching


def test_the_launcher_imports_no_torch():
    """The CLI imports ftkit.distributed.launch on every `ftkit train`, before it knows whether
    to spawn, and `ftkit --help` must stay fast: the launcher (and the package) stay light."""
    code = (
        "import sys, ftkit.distributed.launch\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate', 'peft') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr


def test_nproc_is_removed_from_what_the_processes_run():
    argv = ["--debug", "train", "r.yaml", "--nproc", "2", "--set", "train.lr=1e-3", "--nproc=4", "--overwrite"]
    expected = ["--debug", "train", "r.yaml", "--set", "train.lr=1e-3", "--overwrite"]
    assert launch.argv_without_nproc(argv) == expected


def test_launch_decisions(monkeypatch):
    for key in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    plain = recipe()
    assert launch.needs_launch(plain, 2) is True
    assert launch.needs_launch(plain, None) is False
    fsdp = recipe("distributed: {strategy: fsdp}\n")
    assert launch.needs_launch(fsdp, None) is torch.cuda.is_available()  # one GPU still needs a group
    # DeepSpeed always runs in a process group (gloo on CPU), also with one process
    assert launch.needs_launch(recipe("distributed: {strategy: deepspeed}\n"), None) is True
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(DistributedError, match="--nproc 2: this process was started by a launcher"):
        launch.needs_launch(plain, 2)
    assert launch.needs_launch(plain, None) is False


def test_launcher_config_may_not_contradict_the_recipe(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(DistributedError, match="accelerate config uses fsdp, the recipe says ddp"):
        engines.build_accelerator(recipe(), "no")


def test_bad_input_is_printed_once_across_processes(monkeypatch, tmp_path):
    monkeypatch.delenv(launch.FAILURE_DIR_ENV, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launch.hand_over_failure("error: bad", 2) is True  # rank 0 prints it
    assert launch.hand_over_failure("error: rank 1 only", 1) is False
    monkeypatch.setenv(launch.FAILURE_DIR_ENV, str(tmp_path))
    assert launch.hand_over_failure("error: rank 1 only", 1) is True  # `--nproc`: the launcher prints it
    report = json.loads((tmp_path / "rank-1.json").read_text())
    assert report["message"] == "error: rank 1 only" and report["exit_code"] == 1


def test_resume_refuses_another_number_of_processes():
    from types import SimpleNamespace

    from ftkit.errors import RunDirError

    two = SimpleNamespace(num_processes=2)
    state.check_processes(two, {"processes": 2})
    with pytest.raises(RunDirError, match=r"written by 1 process\(es\), this run has 2; .* resume with --nproc 1"):
        state.check_processes(two, {})  # a one-process checkpoint stores no count


def test_method_hooks_that_need_whole_tensors_are_refused_when_sharded():
    from ftkit.methods.base import MethodHooks

    adalora_like = MethodHooks(before_zero_grad=[lambda step: None])
    engines.check_method_hooks(None, recipe(), adalora_like)  # ddp: every process has whole tensors
    engines.check_method_hooks(None, recipe("distributed: {strategy: fsdp}\n"), MethodHooks(param_groups=[]))
    with pytest.raises(DistributedError, match=r"method.name: lora runs its own training hooks"):
        engines.check_method_hooks(None, recipe("distributed: {strategy: fsdp}\n"), adalora_like)


def test_finiteness_is_checked_on_a_zero3_partition_not_its_empty_placeholder():
    """Under ZeRO-3 a parameter is an empty tensor between forward passes; its values live in `ds_tensor`."""
    from ftkit.errors import NonFiniteError
    from ftkit.train.checkpointer import assert_finite

    model = torch.nn.Linear(2, 2)
    model.weight.data = torch.empty(0)  # what ZeRO-3 leaves in place of the weight
    model.weight.ds_tensor = torch.tensor([1.0, float("nan")])  # this process's partition
    assert collectives.local_tensor(model.weight) is model.weight.ds_tensor
    with pytest.raises(NonFiniteError, match="weight is not finite"):
        assert_finite(model)
    model.weight.ds_tensor = torch.tensor([1.0, 2.0])
    assert_finite(model)
