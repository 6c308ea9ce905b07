"""Bottleneck adapters, AdapterFusion and LLaMA-Adapter through the CLI beyond the methods table: what the
fusion reports, eval and generate on the runs, and the bad input refused in one line (exit 2, no run dir)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from ftkit.models.builtin import build_byte_tokenizer
from tests.support.helpers import make_recipe, run_cli


def refused(tmp_path, recipe) -> str:
    """`ftkit train recipe` refuses: exit 2, nothing on stdout, one line, no run directory; returns the line."""
    code, out, err = run_cli("train", str(recipe))
    assert (code, out) == (2, ""), err
    (line,) = err.strip().splitlines()
    assert not (tmp_path / "runs").exists()
    return line


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory, pretrained_base, steer_data, bottleneck_adapter_runs):
    tmp = tmp_path_factory.mktemp("fusion")
    adapters = [str(run) for run in bottleneck_adapter_runs]
    recipe = make_recipe(
        tmp,
        steer_data,
        name="fusion",
        model={"name": str(pretrained_base)},
        method={"name": "adapter_fusion", "adapters": adapters},
        train={"max_steps": 6, "samples": 0},
    )
    code, _, err = run_cli("train", str(recipe))
    assert code == 0, err
    return tmp / "runs" / "fusion", adapters


def test_fusion_reports_how_it_weighs_each_adapter_on_val(fusion_run):
    run_dir, adapters = fusion_run
    facts = json.loads((run_dir / "summary.json").read_text())["facts"]["method_facts"]
    weights = facts["fusion_weights"]
    assert list(weights) == adapters and facts["fusion_weights_split"] == "val"
    assert math.isclose(sum(weights.values()), 1.0, abs_tol=1e-3) and all(0 < w < 1 for w in weights.values())
    report = (run_dir / "report.md").read_text()
    assert "| fusion weights | " in report and adapters[0] in report
    config = json.loads((run_dir / "final" / "bottleneck_config.json").read_text())
    assert config["method"] == "adapter_fusion" and len(config["adapters"]) == 2


def test_fusion_trains_the_fusion_layers_only(fusion_run):
    """final/ holds each fused adapter exactly as its own run saved it, and the trained fusion layers."""
    from safetensors.torch import load_file

    run_dir, adapters = fusion_run
    fused = load_file(run_dir / "final" / "bottleneck_model.safetensors")
    for i, adapter in enumerate(adapters):
        for name, tensor in load_file(f"{adapter}/final/bottleneck_model.safetensors").items():
            head, _, tail = name.partition(".bottleneck.")
            assert torch.equal(fused[f"{head}.bottleneck_fusion.adapters.{i}.{tail}"], tensor), name
    summary = json.loads((run_dir / "summary.json").read_text())["facts"]
    fusion_params = sum(t.numel() for n, t in fused.items() if ".fusion." in n)
    assert summary["trainable_params"] == fusion_params


def test_eval_and_generate_load_a_fusion_run(fusion_run):
    run_dir, _ = fusion_run
    code, out, err = run_cli("eval", str(run_dir), "--json", "--baseline", "--max-samples", "4")
    assert code == 0, err
    result = json.loads(out)
    assert result["tuned"]["loss"] < result["base"]["loss"]
    code, out, err = run_cli("generate", str(run_dir), "--prompt", "abc", "--max-new-tokens", "4")
    assert code == 0, err


def test_llama_adapter_generates_with_the_kv_cache(tmp_path, steer_data, pretrained_base):
    """peft's adaption prompts with transformers' KV cache: the greedy text of `ftkit generate` equals
    a cache-free greedy decode of the same model."""

    from ftkit.models.target import load_model, load_tokenizer, resolve_target

    recipe = make_recipe(
        tmp_path,
        steer_data,
        model={"name": str(pretrained_base)},
        method={"name": "llama_adapter", "adapter_len": 4, "adapter_layers": 2},
        train={"max_steps": 6, "lr": 3e-2, "samples": 0},
    )
    code, _, err = run_cli("train", str(recipe))
    assert code == 0, err
    run_dir = tmp_path / "runs" / "recipe"
    target = resolve_target(run_dir)
    tokenizer = load_tokenizer(target)
    model = load_model(target, tokenizer)
    ids = tokenizer("abc", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        cached = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=True)
        plain = ids
        for _ in range(6):
            logits = model(input_ids=plain, use_cache=False).logits
            plain = torch.cat([plain, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, plain)
    code, out, err = run_cli("merge", str(run_dir), "--out", str(tmp_path / "merged"))
    assert code == 2 and "ADAPTION_PROMPT adapter adds tokens" in err and not (tmp_path / "merged").exists()


# --- bad input: one line, exit 2, before any run directory -------------------------------------------------------


def test_fusion_refuses_a_run_that_is_not_a_bottleneck_adapter_run(
    tmp_path, tiny_data, trained_runs, bottleneck_adapter_runs
):
    lora = trained_runs["lora"]
    adapters = [str(lora), str(bottleneck_adapter_runs[0])]
    recipe = make_recipe(tmp_path, tiny_data, method={"name": "adapter_fusion", "adapters": adapters})
    line = refused(tmp_path, recipe)
    assert f"method.adapters[0]: {lora} is not a bottleneck-adapter run (method lora)" in line


def test_fusion_refuses_adapters_trained_on_different_bases(tmp_path, tiny_data, bottleneck_adapter_runs):
    (tmp_path / "other").mkdir()
    other = make_recipe(
        tmp_path / "other", tiny_data, name="micro", method={"name": "adapter"}, train={"max_steps": 2, "samples": 0}
    )
    assert run_cli("train", str(other))[0] == 0
    adapters = [str(bottleneck_adapter_runs[0]), str(tmp_path / "other" / "runs" / "micro")]
    recipe = make_recipe(tmp_path, tiny_data, method={"name": "adapter_fusion", "adapters": adapters})
    line = refused(tmp_path, recipe)
    assert "method.adapters[1]:" in line and "fuse adapters trained on the same base" in line


def test_fusion_refuses_a_missing_run(tmp_path, tiny_data, bottleneck_adapter_runs):
    adapters = [str(bottleneck_adapter_runs[0]), str(tmp_path / "nowhere")]
    recipe = make_recipe(tmp_path, tiny_data, method={"name": "adapter_fusion", "adapters": adapters})
    assert "method.adapters[1]: " in refused(tmp_path, recipe) and "does not exist" in refused(tmp_path, recipe)


def test_adapter_refuses_a_layout_it_cannot_wrap(tmp_path, tiny_data):
    """A GPT-2 directory with no weights: the refusal comes from the skeleton, before any weight loads."""
    model_dir = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=262).save_pretrained(model_dir)
    build_byte_tokenizer().save_pretrained(model_dir)
    recipe = make_recipe(tmp_path, tiny_data, model={"name": str(model_dir)}, method={"name": "adapter"})
    line = refused(tmp_path, recipe)
    assert "method.name: adapter wraps each decoder layer's mlp; GPT2LMHeadModel has no" in line


def test_llama_adapter_refuses_more_layers_than_the_model_has(tmp_path, tiny_data):
    recipe = make_recipe(tmp_path, tiny_data, method={"name": "llama_adapter", "adapter_layers": 30})
    line = refused(tmp_path, recipe)
    assert "method.adapter_layers: 30 is more than the model's 2 decoder layers; set it to at most 2" in line


@pytest.mark.slow  # ~19 s: four tiny-llama runs and an eval
def test_docs_adapter_commands_run(tmp_path, monkeypatch):
    """docs/methods.md's adapter / AdapterFusion / LLaMA-Adapter commands as written (cut to two steps),
    from a folder that sees the repository's data/ and recipes/: the fusion recipe finds the two adapter
    runs the commands before it made, where its comments say."""
    from tests.integration.test_readme import DOCS, blocks

    root = Path(__file__).resolve().parents[2]
    commands = [
        line.split()[1:]
        for block in blocks("", DOCS / "methods.md")
        for line in block.splitlines()
        if "recipes/methods/adapter" in line or "recipes/methods/llama_adapter" in line or "eval runs/" in line
    ]
    assert [c[1] for c in commands] == [
        "recipes/methods/adapter.yaml",
        "recipes/methods/adapter.yaml",
        "recipes/methods/adapter_fusion.yaml",
        "runs/methods/adapter_fusion",
        "recipes/methods/llama_adapter.yaml",
    ]
    for name in ("data", "recipes"):
        (tmp_path / name).symlink_to(root / name)
    monkeypatch.chdir(tmp_path)
    short = [f"--set={key}" for key in ("train.max_steps=2", "train.samples=0", "train.batch_size=4")]
    short += [f"--set={key}" for key in ("data.max_samples=8", "data.val=null", "data.val_fraction=0.5")]
    for args in commands:
        extra = short if args[0] == "train" else ["--max-samples", "2"]
        code, out, err = run_cli(*args, *extra)
        assert code == 0, err
    facts = json.loads((tmp_path / "runs/methods/adapter_fusion/summary.json").read_text())["facts"]
    assert list(facts["method_facts"]["fusion_weights"]) == ["runs/methods/adapter", "runs/methods/adapter-pfeiffer"]


@pytest.mark.parametrize("method", ["linear", "adapters"])
def test_merge_config_and_export_refuse_bottleneck_runs_with_the_reason(tmp_path, bottleneck_adapter_runs, method):
    runs = [str(run) for run in bottleneck_adapter_runs]
    config = tmp_path / "merge.yaml"
    config.write_text(f"method: {method}\nmodels:\n  - {{model: {runs[0]}}}\n  - {{model: {runs[1]}}}\n")
    code, out, err = run_cli("merge", "--config", str(config), "--out", str(tmp_path / "out"))
    assert (code, out) == (2, "") and "not linear in the base weights" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    code, out, err = run_cli("export", runs[0], "--gguf", str(tmp_path / "m.gguf"))
    assert (code, out) == (2, "") and "cannot export: bottleneck adapters" in err and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("builtin:tiny-llama", "(hidden_size 64), this run's model has hidden_size 192"),  # refused from the configs
        ("builtin:micro-llama", ", not on this run's model "),  # same shapes, other weights: refused once loaded
    ],
)
def test_fusion_refuses_a_run_model_other_than_the_adapters_base(
    tmp_path, tiny_data, bottleneck_adapter_runs, model, expected
):
    adapters = [str(run) for run in bottleneck_adapter_runs]
    recipe = make_recipe(
        tmp_path, tiny_data, model={"name": model}, method={"name": "adapter_fusion", "adapters": adapters}
    )
    code, out, err = run_cli("train", str(recipe))
    assert (code, out) == (2, ""), err
    (line,) = err.strip().splitlines()
    # other weights of the same shape are found once the base loads: the run directory made for it is removed
    assert not (tmp_path / "runs" / "recipe").exists()
    assert line.startswith("error: method.adapters[0]: ") and expected in line
    assert "set model.name to the base the adapters were trained on" in line
