"""Methods that only run on a CUDA GPU (skipped by default: `pytest -m gpu`).

LoftQ: peft computes it on CUDA only (peft/utils/loftq_utils.py), so CPU runs refuse it up
front (tests/unit/test_method_hooks.py); here it runs end to end.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.support.helpers import make_recipe, read_metrics, run_cli

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loftq_starts_closer_to_the_16_bit_model_and_trains(tmp_path, tiny_data):
    """QLoRA with init loftq: the 4-bit base + LoftQ adapter is nearer the 16-bit model than the
    4-bit base alone (that is LoftQ's point), the loss falls, and final/ reloads on a 4-bit base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from ftkit.data import collate, load_splits
    from ftkit.methods import RunInfo, get_method
    from ftkit.models.load import build_model
    from ftkit.recipe import load_recipe
    from ftkit.tasks.causal_lm import SFT, token_logits
    from ftkit.tasks.objective import evaluate

    method = {"name": "qlora", "r": 8, "alpha": 8, "dropout": 0.0, "init": "loftq"}
    recipe_path = make_recipe(tmp_path, tiny_data, name="loftq", method=method, train={"lr": 1e-2})
    code, out, err = run_cli("train", str(recipe_path))
    assert code == 0 and out == "", err
    run_dir = tmp_path / "runs" / "loftq"
    losses = [r["loss"] for r in read_metrics(run_dir)[0]]
    assert sum(losses[-5:]) / 5 <= 0.9 * sum(losses[:5]) / 5 and all(map(math.isfinite, losses))

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base_dir = json.loads((run_dir / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    recipe = load_recipe(recipe_path)
    full = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).cuda()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    val = load_splits(recipe.data, tokenizer, recipe.train.seed).val
    batch = {k: v.cuda() for k, v in collate(val[:4], tokenizer.pad_token_id).items()}

    model, _, _ = build_model(recipe.model, "cuda", recipe.train.seed, base_dir=tmp_path / "fresh")
    loftq = get_method("qlora").apply(model, recipe.method, RunInfo(total_steps=20))
    with torch.no_grad():
        target = token_logits(full, batch)
        with_adapter = token_logits(loftq, batch)
        with loftq.disable_adapter():
            quantized_only = token_logits(loftq, batch)
    assert (with_adapter - target).norm() < (quantized_only - target).norm()

    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, device_map={"": 0})
    reloaded = PeftModel.from_pretrained(base, run_dir / "final")
    val_loss = evaluate(reloaded, val, recipe.train.batch_size, tokenizer.pad_token_id, torch.device("cuda"), SFT())[
        "loss"
    ]
    assert val_loss == pytest.approx(read_metrics(run_dir)[1][-1]["val_loss"], abs=1e-4)
