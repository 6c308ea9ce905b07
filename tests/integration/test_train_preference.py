"""Preference tuning through `ftkit train`, as a user runs it: DPO after SFT with LoRA learns the
tiny extraction task's preferences, the adapter loads with the real peft, the reference is the same
network (no copy), and every method and objective runs end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from ftkit.data import load_splits
from ftkit.recipe import load_recipe
from ftkit.tasks.preference import evaluate_preferences
from tests.support.helpers import make_recipe, make_rows, read_metrics, run_cli, write_jsonl
from tests.support.methods_table import METHOD_CASES, resolved


def load_garble():
    """`garble` of scripts/make_preference_data.py: the same one-character slips as the shipped set."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "make_preference_data.py"
    sys.path.insert(0, str(script.parent))  # it imports its sibling make_quickstart_data
    spec = importlib.util.spec_from_file_location("make_preference_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.garble


garble = load_garble()


def make_pairs(n: int, seed: int) -> list[dict]:
    """Preference rows of the tiny extraction task: the right answer vs one field (color, shape or size)
    garbled by one character, as the shipped quickstart set is built."""
    rng = random.Random(seed)
    pairs = []
    for row in make_rows(n, seed):
        chosen = row["output"]
        field, value = rng.choice(re.findall(r"(\w+)\[(\w+)\]", chosen))
        rejected = chosen.replace(f"{field}[{value}]", f"{field}[{garble(rng, value)}]")
        pairs.append({"prompt": f"{row['instruction']}\n\n{row['input']}", "chosen": chosen, "rejected": rejected})
    return pairs


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    write_jsonl(root / "train.jsonl", make_pairs(256, seed=11))  # 40 steps × 8 pairs: each pair seen ~once
    write_jsonl(root / "val.jsonl", make_pairs(32, seed=12))  # prompts unseen in SFT and DPO training
    return root


def preference_recipe(tmp: Path, pair_data: Path, name: str, **sections) -> Path:
    data = {"train": str(pair_data / "train.jsonl"), "val": str(pair_data / "val.jsonl"), "format": "preference"}
    return make_recipe(tmp, pair_data, name=name, data=data, **sections)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, pair_data):
    """DPO with LoRA on micro-llama: 40 steps of 8 pairs, evaluated at steps 20 and 40."""
    tmp = tmp_path_factory.mktemp("dpo")
    recipe = preference_recipe(
        tmp,
        pair_data,
        name="dpo",
        objective={"name": "dpo", "beta": 0.5},
        train={"lr": 3e-3, "max_steps": 40, "eval_every": 20},
    )
    return recipe, tmp / "runs" / "dpo", run_cli("train", str(recipe))


@pytest.fixture(scope="module")
def sft_then_dpo(tmp_path_factory, tiny_data, pair_data):
    """SFT (LoRA, 10 steps) on the tiny task, then 2 DPO steps with a new LoRA on its merged result."""
    tmp = tmp_path_factory.mktemp("sft-dpo")
    sft = make_recipe(tmp, tiny_data, name="sft", train={"max_steps": 10, "samples": 0})
    code, _, err = run_cli("train", str(sft))
    assert code == 0, err
    recipe = preference_recipe(
        tmp,
        pair_data,
        name="dpo",
        model={"name": str(tmp / "runs" / "sft" / "final")},
        objective={"name": "dpo"},
        train={"max_steps": 2, "samples": 0},
    )
    code, _, err = run_cli("train", str(recipe))
    assert code == 0, err
    return tmp / "runs" / "dpo", tmp / "runs" / "sft"


def test_dpo_raises_val_reward_accuracy(dpo_run):
    _, run_dir, (code, out, err) = dpo_run
    assert code == 0, err
    assert out == ""
    train, val = read_metrics(run_dir)
    assert train[0]["rewards/accuracy"] == 0.0  # step 1: policy = reference, every margin a tie
    # 0.8 on 32 unseen pairs = 26 right (the runs we measured reach 0.84 at step 20 and 0.91 at 40);
    # the reference scores 0 (all ties), and a model that learned nothing general would sit near 0.5
    assert val[-1]["val_rewards/accuracy"] > 0.8, [r["val_rewards/accuracy"] for r in val]
    assert val[-1]["val_rewards/margin"] > 0 and val[-1]["val_loss"] < math.log(2)
    assert all(math.isfinite(r["loss"]) for r in train)


def test_dpo_adapter_loads_with_peft_and_reproduces_val_metrics(dpo_run):
    """final/ loads with `PeftModel.from_pretrained` on base/, and `evaluate_preferences` on it
    reproduces the last val metrics of training (1e-5: the same maths in another process)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe_path, run_dir, _ = dpo_run
    config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (run_dir / "base").resolve()
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    recipe = load_recipe(recipe_path)
    pairs = load_splits(recipe.data, tokenizer, recipe.train.seed).val
    result = evaluate_preferences(
        model, pairs, recipe.objective, pad_id=tokenizer.pad_token_id, batch_size=recipe.train.batch_size
    )
    _, val = read_metrics(run_dir)
    for key in ("loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "logps/chosen"):
        logged = val[-1]["val_loss" if key == "loss" else f"val_{key}"]
        assert result[key] == pytest.approx(logged, abs=1e-5), key


def test_ftkit_eval_reports_reward_accuracy_and_margins(dpo_run):
    """`ftkit eval RUN --json --baseline` on a DPO run: the val metrics of training (1e-5), and the
    reference as the policy scores the tie by definition (rewards 0, accuracy 0)."""
    _, run_dir, _ = dpo_run
    code, out, err = run_cli("eval", str(run_dir), "--json", "--baseline")
    assert code == 0, err
    result = json.loads(out)
    assert result["format"] == "preference" and result["n_examples"] == 32 and result["generations"] == []
    _, val = read_metrics(run_dir)
    for key in ("loss", "rewards/accuracy", "rewards/margin", "rewards/rejected", "logps/accuracy"):
        assert result["tuned"][key] == pytest.approx(val[-1]["val_loss" if key == "loss" else f"val_{key}"], abs=1e-5)
    assert result["base"]["rewards/accuracy"] == 0.0 and result["base"]["rewards/margin"] == 0.0
    assert result["base"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert Path(result["file"]).parent == run_dir


def test_merge_verifies_on_the_runs_pairs(dpo_run, tmp_path):
    """`ftkit merge` of a DPO run checks the merge on its validation pairs (both answers of each), the
    preference task's examples: the merged model reproduces base + adapter (float32: ≤ 1e-4)."""
    _, run_dir, _ = dpo_run
    code, _, err = run_cli("merge", str(run_dir), "--out", str(tmp_path / "merged"), "--samples", "4")
    assert code == 0, err
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["merge"]["passed"] and report["merge"]["max_abs_logit_diff"] <= 1e-4
    assert report["samples"] == 4 and "validation set" in report["sample_source"]


def test_reference_is_the_same_network_without_a_copy(dpo_run, tmp_path, tiny_data):
    """The disabled-adapter reference adds no parameters: total = an SFT run's with the same LoRA."""
    _, run_dir, _ = dpo_run
    facts = json.loads((run_dir / "summary.json").read_text())["facts"]
    assert facts["reference"] == "disabled adapter" and facts["reference_params"] == 0
    from ftkit.methods import get_method
    from ftkit.models.load import build_model, count_parameters
    from ftkit.recipe.schema import ModelSection

    model, _, _ = build_model(ModelSection(name="builtin:micro-llama"), "cpu", seed=0)
    lora = get_method("lora").apply(model, load_recipe(make_recipe(tmp_path, tiny_data)).method)
    assert facts["total_params"] == count_parameters(lora)[1]
    assert facts["objective"] == "dpo" and facts["beta"] == 0.5


def test_report_explains_and_diagnoses_preferences(dpo_run):
    _, run_dir, _ = dpo_run
    report = (run_dir / "report.md").read_text()
    assert "## Preferences" in report and "rewards/accuracy" in report and "Reward accuracy" in report
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["preference"]["verdict"] == "learning the preference"
    assert "val_ppl" not in (run_dir / "metrics.jsonl").read_text()  # exp(DPO loss) is no perplexity


def test_dpo_after_sft_starts_from_the_merged_sft_model(sft_then_dpo):
    """model.name: an SFT adapter → base/ is that adapter merged into its base, and it is DPO's reference:
    at step 1 every margin is 0. Logits within 1e-5: merging W + s·BA only reorders float additions."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, sft_dir = sft_then_dpo
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_dir / "base"), sft_dir / "final")
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "base")
    ids = torch.tensor([list(b"Extract.\n\nA red cube of size 7.")])
    assert torch.allclose(sft(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
    train, _ = read_metrics(run_dir)
    assert train[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert PeftModel.from_pretrained(merged, run_dir / "final") is not None
    # `ftkit eval` loads the adapter on the merged SFT model (base/), not on the adapter dir the recipe
    # names; with the adapter off, policy = reference: every pair a tie, loss log 2
    code, out, err = run_cli("eval", str(run_dir), "--json", "--baseline", "--max-samples", "4")
    assert code == 0, err
    result = json.loads(out)
    assert Path(result["base_model"]) == (run_dir / "base").resolve()
    assert result["base"]["loss"] == pytest.approx(math.log(2), abs=1e-6)


# --- every method, every objective: a few steps each -----------------------------------------------------------------

# dpo with lora is the run above; here every other method, and the other objectives with lora
RUNS = {
    f"dpo-{name}": (case, {"name": "dpo"})
    for name, case in METHOD_CASES.items()
    if name not in ("lora", "moe_router")  # moe_router: an SFT-table row on a MoE base (tests/conftest.py moe_base)
}
RUNS |= {name: (METHOD_CASES["lora"], {"name": name}) for name in ("ipo", "orpo", "simpo")}
RUNS["dpo-precompute"] = (METHOD_CASES["full"], {"name": "dpo", "reference": "precompute"})
RUNS["dpo-sft_weight"] = (METHOD_CASES["lora"], {"name": "dpo", "sft_weight": 1.0})  # RPO
del RUNS["dpo-medusa"]  # medusa's heads learn from SFT only; its refusal of dpo: tests/integration/test_medusa_cli.py


@pytest.fixture(scope="module", params=sorted(RUNS))
def short_run(request, tmp_path_factory, pair_data):
    case, objective = RUNS[request.param]
    case = resolved(case, request)  # adapter_fusion: the adapter runs it fuses
    tmp = tmp_path_factory.mktemp(request.param)
    # AdaLoRA reallocates its rank budget between tinit and total - tfinal: leave it room
    train = {**case.get("train", {}), "max_steps": 8 if case["method"]["name"] == "adalora" else 4}
    train |= {"batch_size": 4, "samples": 0}
    # adapter_fusion fuses adapters trained on the pretrained base, so it runs on that base
    fused = case["method"]["name"] == "adapter_fusion"
    extra = {"model": {"name": str(request.getfixturevalue("pretrained_base"))}} if fused else {}
    recipe = preference_recipe(
        tmp, pair_data, request.param, method=case["method"], objective=objective, train=train, **extra
    )
    return request.param, recipe, tmp / "runs" / request.param, run_cli("train", str(recipe))


def _starts_at_base(recipe) -> bool:
    """Prompt methods and PiSSA/OLoRA do not start at the base: their reference is precomputed."""
    prompt = recipe.method.name in ("prompt_tuning", "prefix_tuning", "p_tuning")
    return not prompt and getattr(recipe.method, "init", None) not in ("pissa", "olora")


def test_every_method_and_objective_trains(short_run):
    name, recipe_path, run_dir, (code, out, err) = short_run
    assert code == 0, err
    assert out == ""
    train, val = read_metrics(run_dir)
    assert len(train) == load_recipe(recipe_path).train.max_steps and all(math.isfinite(r["loss"]) for r in train)
    assert {"rewards/accuracy", "rewards/margin", "logps/chosen"} <= set(train[-1]) and "val_rewards/accuracy" in val[
        -1
    ]
    facts = json.loads((run_dir / "summary.json").read_text())["facts"]
    recipe = load_recipe(recipe_path)
    expected = (
        {
            "auto": ("disabled adapter" if _starts_at_base(recipe) else "precomputed")
            if recipe.method.is_adapter
            else "frozen copy",
            "precompute": "precomputed",
        }[recipe.objective.reference]
        if recipe.objective.needs_reference
        else "none"
    )
    assert facts["reference"] == expected
    # with sft_weight (RPO) the chosen answers' NLL is logged, and step 1's loss is ln 2 + that NLL
    assert ("nll/chosen" in train[0]) == bool(recipe.objective.sft_weight)
    if recipe.objective.sft_weight:
        assert train[0]["loss"] == pytest.approx(math.log(2) + train[0]["nll/chosen"], abs=1e-5)
    # a frozen copy holds the whole model once more; the other references hold nothing
    assert facts["reference_params"] == (facts["total_params"] if expected == "frozen copy" else 0)
    assert (run_dir / "reference_logps.safetensors").is_file() == (expected == "precomputed")
    # step 1: policy = reference (prompt methods / PiSSA / OLoRA get a reference precomputed in eval
    # mode, while step 1 runs in train mode: their first margin is near, not at, zero; so does LongLoRA,
    # whose train-mode forward uses S²-Attn and whose eval-mode reference full attention)
    if recipe.method.name == "longlora":
        assert 0 < abs(train[0]["rewards/margin"]) < 0.05
    elif expected in ("disabled adapter", "frozen copy") or recipe.objective.reference == "precompute":
        assert train[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)  # step 1: policy = reference


@pytest.mark.slow  # long (~50-90 s): a documented flow on the real model; run with -m slow
def test_readme_dpo_after_sft_commands_run(smollm2, tmp_path, monkeypatch):
    """README's `ftkit train recipes/quickstart.yaml` then `ftkit train recipes/dpo.yaml` on the shipped
    data and the real model (DPO after SFT on SmolLM2): two steps each, 8 val rows (evaluating all 100
    would dominate the suite's time), the DPO recipe pointed at this SFT run's adapter. The commands
    are docs/preference.md's."""
    from tests.integration.test_readme import DOCS, blocks

    block = next(b for b in blocks("", DOCS / "preference.md") if b.startswith("ftkit train recipes/quickstart.yaml"))
    trains = [line.split("#")[0].split() for line in block.splitlines() if line.startswith("ftkit train")]
    assert trains == [["ftkit", "train", "recipes/quickstart.yaml"], ["ftkit", "train", "recipes/dpo.yaml"]]
    root = Path(__file__).resolve().parents[2]
    for name in ("quickstart", "preference"):
        lines = (root / "data" / name / "val.jsonl").read_text().splitlines(keepends=True)
        (tmp_path / f"{name}-val.jsonl").write_text("".join(lines[:8]))
    monkeypatch.chdir(root)
    short = ["--set", "train.max_steps=2", "--set", "train.samples=0"]
    sft = ["--set", f"data.val={tmp_path / 'quickstart-val.jsonl'}", "--output-dir", str(tmp_path / "qs")]
    code, out, err = run_cli("train", "recipes/quickstart.yaml", *short, *sft)
    assert code == 0, err
    dpo = ["--set", f"model.name={tmp_path / 'qs' / 'final'}", "--set", f"data.val={tmp_path / 'preference-val.jsonl'}"]
    code, out, err = run_cli("train", "recipes/dpo.yaml", *short, *dpo, "--output-dir", str(tmp_path / "dpo"))
    assert code == 0, err
    assert out == ""
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert summary["facts"]["train_examples"] == 2000 and summary["facts"]["reference"] == "disabled adapter"
