"""Every method in the table, through `ftkit train` as a user runs it: loss falls, the run
directory is complete, stdout stays clean, ftkit's trainable count is peft's, final/ loads
back with the real libraries and reproduces training, and merging equals the adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ftkit.data import collate, load_splits
from ftkit.recipe import load_recipe
from ftkit.tasks import task_for
from ftkit.tasks.causal_lm import SFT, token_logits
from ftkit.tasks.objective import evaluate
from ftkit.train.optim import build_optimizer
from tests.support.helpers import read_metrics, run_cli
from tests.support.methods_table import METHOD_CASES, Run, row_trainer

RUN_FILES = {"recipe.yaml", "metrics.jsonl", "final", "summary.json", "loss.png", "report.md"}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """`runs(name)`: the table row trained once through the CLI (cached for the module)."""

    def data_for(pretrained: bool) -> Path:
        return request.getfixturevalue("steer_data" if pretrained else "tiny_data")

    return row_trainer(request, tmp_path_factory, METHOD_CASES, data_for)


@pytest.fixture(scope="module", params=sorted(METHOD_CASES))
def trained(request, runs) -> Run:
    return runs(request.param)


def load_final(run: Run):
    """Load final/ with the real transformers / peft APIs, as a user without ftkit would."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    final = run.run_dir / "final"
    if (final / "bottleneck_config.json").is_file():
        # ftkit's bottleneck adapters: the transformers base, and the adapters attached from final/'s
        # safetensors and config (ftkit.models.bottleneck, what eval and generate use)
        from ftkit.models import bottleneck

        recipe = load_recipe(run.recipe)
        base_dir = run.run_dir / "base" if (run.run_dir / "base").is_dir() else recipe.model.name
        return bottleneck.attach(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), final)
    if (final / "adapter_config.json").is_file():
        recipe = load_recipe(run.recipe)
        kwargs = {}
        if recipe.model.quantization is not None:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            )
            kwargs["device_map"] = {"": "cpu"}
        base = AutoModelForCausalLM.from_pretrained(run.adapter_base, dtype=torch.float32, **kwargs)
        for module in base.modules():
            # the kernel training used: left on, bitsandbytes' CPU eval forward repacks 4-bit weights with
            # bf16 scales (and peft's DoRA then reads the repacked layout as if it were the plain one:
            # measured val_loss 1.17 for qdora against 0.68); see ftkit.models.load.keep_4bit_layout
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        return PeftModel.from_pretrained(base, final)
    return AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)


def test_cli_succeeds_with_clean_stdout(trained):
    code, out, err = trained.result
    assert code == 0, err
    assert out == ""
    assert {p.name for p in trained.run_dir.iterdir()} >= RUN_FILES | ({"base"} if not trained.pretrained else set())


def test_loss_falls(trained):
    train, val = read_metrics(trained.run_dir)
    losses = [r["loss"] for r in train]
    assert all(math.isfinite(x) for x in losses)
    if trained.pretrained:
        # the frozen base already knows the format: below chance, even where the method's
        # random prompt encoder disturbs it at first (p_tuning starts near 3.4)
        assert losses[0] < math.log(262), losses[0]
    else:
        # random init over a 262-token vocab starts near ln(vocab); ±50% leaves room for init noise
        # (medusa: the LM's loss plus head k's weighted decay^k, each near ln(vocab) too)
        assert abs(losses[0] - chance_multiple(trained) * math.log(262)) < 0.5 * math.log(262)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last <= 0.9 * first, (first, last)
    assert val and math.isfinite(val[-1]["val_loss"])


def chance_multiple(run: Run) -> float:
    """How many cross-entropies near ln(vocab) the first loss of a random-init row sums: 1, or medusa's
    LM loss plus decay^k per head."""
    method = load_recipe(run.recipe).method
    if method.name != "medusa":
        return 1.0
    return 1.0 + sum(method.decay**k for k in range(method.heads))


def test_summary_has_trainable_params(trained):
    summary = json.loads((trained.run_dir / "summary.json").read_text())
    facts = summary["facts"]
    assert 0 < facts["trainable_params"] <= facts["total_params"]
    if trained.name != "full":
        assert facts["trainable_params"] < facts["total_params"]
    assert facts["status"] == "completed"
    assert summary["diagnosis"]["verdict"]


def test_trainable_count_is_what_peft_reports(trained, tmp_path):
    """The count ftkit reports (summary.json) is peft's own `get_nb_trainable_parameters()` of the
    model as ftkit builds it (same recipe, same apply), and the sum of the trainable tensors."""
    from accelerate.utils import set_seed

    from ftkit.methods import RunInfo, get_method
    from ftkit.models.load import build_model, count_parameters

    recipe = load_recipe(trained.recipe)
    model, tokenizer, _ = build_model(recipe.model, "cpu", recipe.train.seed, base_dir=tmp_path / "base")
    examples = load_splits(recipe.data, tokenizer, recipe.train.seed).train  # data-aware methods (LoRA-drop)
    run = RunInfo(
        total_steps=recipe.train.max_steps,
        train=recipe.train,
        examples=examples,
        pad_id=tokenizer.pad_token_id,
        objective=task_for(recipe).scoring_objective(recipe),
        build_optimizer=build_optimizer,
    )
    set_seed(recipe.train.seed)  # as ftkit train does before apply
    model = get_method(recipe.method.name).apply(model, recipe.method, run)
    ours = count_parameters(model)[0]
    reported = json.loads((trained.run_dir / "summary.json").read_text())["facts"]["trainable_params"]
    assert ours == reported == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if recipe.method.name == "medusa":  # peft's LoRA count plus the heads beside the peft model
        heads = sum(p.numel() for p in model.medusa.parameters() if p.requires_grad)
        assert model.base.get_nb_trainable_parameters()[0] + heads == ours
    elif recipe.method.is_adapter:
        assert model.get_nb_trainable_parameters()[0] == ours


def test_final_loads_and_matches_training(trained):
    """The reloaded final/ reproduces the val_loss the in-training model logged at the last step."""
    model = load_final(trained)
    recipe, tokenizer, val = trained.val_examples()
    val_loss = evaluate(model, val, recipe.train.batch_size, tokenizer.pad_token_id, torch.device("cpu"), SFT())["loss"]
    _, logged = read_metrics(trained.run_dir)
    # medusa's val_loss adds its heads' losses; its LM part (base + LoRA, what peft loads) is val_lm_loss
    key = "val_lm_loss" if recipe.method.name == "medusa" else "val_loss"
    assert val_loss == pytest.approx(logged[-1][key], abs=1e-5)
    if recipe.method.is_adapter:
        assert (trained.run_dir / "final" / "adapter_model.safetensors").is_file()


def test_merge_equals_adapter(trained):
    """merge_and_unload folds the adapter into W: same logits within fp32 rounding (1e-4 on
    logits of magnitude ~10); prompt methods have nothing to fold and peft has no merge for them."""
    recipe = load_recipe(trained.recipe)
    if recipe.method.name in ("adapter", "adapter_fusion"):
        code, out, err = run_cli("merge", str(trained.run_dir), "--out", str(trained.run_dir.parent / "merged"))
        assert code == 2 and out == "" and "not linear in the base weights" in err
        assert len(err.strip().splitlines()) == 1 and not (trained.run_dir.parent / "merged").exists()
        return
    if not recipe.method.is_adapter:
        pytest.skip("full and freeze save a whole model: nothing to merge")
    model = load_final(trained)
    if not recipe.method.mergeable:
        with pytest.raises(AttributeError):
            model.merge_and_unload()
        return
    if recipe.model.quantization is not None:
        pytest.skip("merging into a 4-bit base re-quantizes (R23): the merge command's job, not this table's")
    from transformers import AutoModelForCausalLM

    _, tokenizer, val = trained.val_examples()
    batch = collate(val[:4], tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        adapter_logits = token_logits(model, batch)
        merged = model.merge_and_unload()
        merged_logits = token_logits(merged, batch)
        base = AutoModelForCausalLM.from_pretrained(trained.adapter_base, dtype=torch.float32)
        base_logits = token_logits(base, batch)
    assert (merged_logits - adapter_logits).abs().max() <= 1e-4
    assert (merged_logits - base_logits).abs().max() > 1e-3  # training moved the model


def test_report_is_readable(trained):
    report = (trained.run_dir / "report.md").read_text()
    assert "loss.png" in report and "trainable" in report.lower()
    assert (trained.run_dir / "loss.png").stat().st_size > 1000


# --- what single rows promise beyond the table's checks ----------------------------------------


def test_adalora_cut_the_rank_budget_to_target_r(runs):
    """The loop called AdaLoRA's update every step: the saved rank pattern keeps target_r per layer
    on average, and reloading resizes each layer to it."""
    run = runs("adalora")
    config = json.loads((run.run_dir / "final" / "adapter_config.json").read_text())
    method = METHOD_CASES["adalora"]["method"]
    pattern = config["rank_pattern"]
    assert pattern, "no rank pattern: update_and_allocate never ran"
    kept = sum(sum(mask) for mask in pattern.values())
    assert kept == method["target_r"] * len(pattern)
    assert any(sum(mask) != method["target_r"] for mask in pattern.values())  # reallocated, not uniform
    train, _ = read_metrics(run.run_dir)
    assert all(r["reg_loss"] > 0 for r in train)  # the orthogonality penalty was in the loss


def test_moe_router_trains_routers_and_expert_lora_into_a_plain_mixtral(runs):
    """final/ is a Mixtral with the LoRA merged into the experts (no adapter files), the routers moved,
    the load-balancing penalty was in the loss, and routing.json holds the val routing before and after."""
    from safetensors.torch import load_file

    run = runs("moe_router")
    final = run.run_dir / "final"
    assert not (final / "adapter_config.json").exists()
    assert json.loads((final / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    moe = Path(load_recipe(run.recipe).model.name)
    before, after = load_file(moe / "model.safetensors"), load_file(final / "model.safetensors")
    routers = [n for n in before if n.endswith("block_sparse_moe.gate.weight")]
    experts = [n for n in before if ".experts." in n]
    assert routers and all(not torch.equal(before[n], after[n]) for n in routers)
    assert all(not torch.equal(before[n], after[n]) for n in experts)  # each expert's LoRA, merged
    train, _ = read_metrics(run.run_dir)
    assert all(r["reg_loss"] > 0 for r in train)
    routing = json.loads((run.run_dir / "routing.json").read_text())
    assert routing["before"].keys() == routing["after"].keys() and routing["after"]


@pytest.mark.parametrize("name", ["lora_pissa", "lora_olora"])
def test_mutating_init_is_saved_as_a_plain_lora_of_rank_2r(runs, name):
    """PiSSA/OLoRA rewrite W; final/ is the equivalent plain LoRA (rank 2r) on the untouched base,
    which is why it loads on base/ and reproduces training (the table's reload check)."""
    run = runs(name)
    config = json.loads((run.run_dir / "final" / "adapter_config.json").read_text())
    assert config["r"] == 2 * METHOD_CASES[name]["method"]["r"]
    assert config["init_lora_weights"] is True


@pytest.mark.parametrize("name", ["lora_plus", "lora_fa"])
def test_checkpoint_holds_the_method_s_own_optimizer_groups(runs, name):
    """LoRA+'s lr_scale groups and LoRA-FA's named-parameter AdamW survive the pickle-free checkpoint."""
    from ftkit.train.checkpoint import load_optimizer_state

    step = runs(name).run_dir / "checkpoints" / "step-10"
    assert (step / "complete.json").is_file()
    state = load_optimizer_state(step)
    if name == "lora_plus":
        assert [g["lr_scale"] for g in state["param_groups"]] == [1.0, METHOD_CASES[name]["method"]["lr_ratio"]]
    else:
        (group,) = state["param_groups"]
        assert any("lora_B" in n for n in group["names"])
        assert any(isinstance(key, str) and "lora" in key for key in state["state"])  # state keyed by A/B pair


@pytest.fixture(scope="module")
def runs_with_evals(request, tmp_path_factory):
    """`runs_with_evals(name)`: the table row again with eval_every 3 and no samples."""
    cases = {
        name: {**case, "train": {**case.get("train", {}), "eval_every": 3, "samples": 0}}
        for name, case in METHOD_CASES.items()
    }

    def data_for(pretrained: bool) -> Path:
        return request.getfixturevalue("steer_data" if pretrained else "tiny_data")

    return row_trainer(request, tmp_path_factory, cases, data_for)


def test_evaluation_never_changes_training(trained, runs_with_evals):
    """Issue 15 part 3: a run that evaluates every 3 steps (and writes no samples) trains on the same
    numbers, bit for bit (fp32, CPU), as the table's run (which evaluates at the end only and writes a
    sample after final/): the same losses and the same final/ tensors. QLoRA needed a fix for this
    (ftkit.models.load.keep_4bit_layout: bitsandbytes repacked 4-bit weights on the first eval forward)."""
    from safetensors.torch import load_file

    evaluated = runs_with_evals(trained.name)
    assert evaluated.result[0] == 0, evaluated.result[2]
    losses, vals = read_metrics(evaluated.run_dir)
    reference, _ = read_metrics(trained.run_dir)
    assert len(vals) > 1  # it did evaluate mid-run
    assert [r["loss"] for r in losses] == [r["loss"] for r in reference]
    for file in sorted((trained.run_dir / "final").glob("*.safetensors")):
        ours, theirs = load_file(evaluated.run_dir / "final" / file.name), load_file(file)
        assert sorted(ours) == sorted(theirs)
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), file.name
