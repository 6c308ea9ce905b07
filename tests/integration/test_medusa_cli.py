"""method medusa through the CLI: training, final/ in FasterDecoding/Medusa's layout, `ftkit generate`
equal to plain greedy decoding of the same model, `ftkit eval`'s figures, exact resume, merge, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.helpers import make_recipe, read_metrics, run_cli
from tests.support.resume_helpers import assert_same_run, sections, train

FROZEN = {"name": "medusa", "heads": 3, "projection": "shared"}
LORA = {"name": "medusa", "heads": 2, "base": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
PROMPTS = ["A red cube of size 3.", "A green cone of size 41.", "A blue sphere of size 9."]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """`runs(name)`: a medusa run trained once (20 steps on micro-llama)."""
    done = {}

    def get(name: str):
        if name not in done:
            tmp = tmp_path_factory.mktemp(name)
            method = FROZEN if name == "frozen" else LORA
            recipe = make_recipe(tmp, tiny_data, name=name, method=method, train={"lr": 1e-2, "samples": 0})
            done[name] = (run_cli("train", str(recipe)), tmp / "runs" / name)
        return done[name]

    return get


class ResBlock(nn.Module):  # FasterDecoding/Medusa's, verbatim in structure
    def __init__(self, hidden_size):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def reference_heads(config: dict) -> nn.ModuleList:
    """The reference code's `medusa_head` module for a config.json (medusa_model.py, MedusaModelABC)."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    return nn.ModuleList(
        nn.Sequential(*([ResBlock(hidden)] * config["medusa_num_layers"]), nn.Linear(hidden, vocab, bias=False))
        for _ in range(config["medusa_num_heads"])
    )


@pytest.mark.parametrize("name", ["frozen", "lora"])
def test_trains_and_final_has_the_reference_layout(runs, name):
    (code, out, err), run_dir = runs(name)
    assert (code, out) == (0, ""), err
    train, val = read_metrics(run_dir)
    losses = [r["loss"] for r in train]
    # the bar of the methods table (tests/integration/test_train_methods.py)
    assert sum(losses[-5:]) / 5 <= 0.9 * sum(losses[:5]) / 5
    assert "medusa0_acc" in train[-1] and "val_medusa1_loss" in val[-1]
    final = run_dir / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["medusa_num_heads"] == (3 if name == "frozen" else 2) and config["medusa_num_layers"] == 1
    assert config["base_model_name_or_path"] == str((run_dir / "base").resolve())
    heads = reference_heads(config)
    heads.load_state_dict(load_file(final / "medusa_lm_head.safetensors"), strict=True)  # every key, every shape
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    if name == "frozen":  # a shared projection is written out as lm_head's weight for every head
        assert torch.equal(heads[0][1].weight, base.get_output_embeddings().weight)
    else:
        assert (final / "adapter_config.json").is_file()
        PeftModel.from_pretrained(base, final)  # the LoRA loads with peft


def _greedy(model, tokenizer, prompts, budget):
    outs = []
    for prompt in prompts:  # --raw: the text after the BOS token (ftkit.tasks.generation.build_prompt)
        ids = tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False, return_tensors="pt").input_ids
        new = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )[0, ids.shape[1]:]  # fmt: skip
        outs.append(tokenizer.decode(new, skip_special_tokens=True).replace("\n", "\\n"))
    return outs


@pytest.mark.parametrize("name", ["frozen", "lora"])
def test_generate_equals_plain_greedy_of_the_same_model(runs, name, monkeypatch):
    (code, _, err), run_dir = runs(name)
    assert code == 0, err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("\n".join(PROMPTS) + "\n"))
    code, out, err = run_cli("generate", str(run_dir), "--raw", "--max-new-tokens", "24")
    assert code == 0, err
    final = run_dir / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "base", dtype=torch.float32)
    if name == "lora":
        model = PeftModel.from_pretrained(model, final)
    model.eval()
    assert out.removesuffix("\n").split("\n") == _greedy(model, tokenizer, PROMPTS, 24)  # not splitlines: \x0b


def test_eval_reports_heads_speed_and_identical_outputs(runs):
    (code, _, err), run_dir = runs("frozen")
    assert code == 0, err
    code, out, err = run_cli("eval", str(run_dir), "--max-samples", "4", "--max-new-tokens", "16", "--json")
    assert code == 0, err
    result = json.loads(out)
    medusa = result["medusa"]
    assert set(medusa) >= {"head0_top1", "head2_top1", "tokens_per_forward", "speedup_vs_generate"}
    assert medusa["identical_share"] == 1.0 and medusa["prompts"] == 4
    assert medusa["tokens_per_forward"] >= 1.0 and math.isfinite(medusa["speedup_vs_plain_loop"])
    assert 0.0 <= medusa["head0_top1"] <= 1.0
    assert all(r["identical_to_generate"] for r in result["generations"])
    assert "head0_top1" in err or "medusa" in json.dumps(result)


def test_merge_lora_writes_heads_beside_and_frozen_refuses(runs, tmp_path):
    (code, _, err), run_dir = runs("lora")
    assert code == 0, err
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", str(run_dir), "--out", str(out))
    assert code == 0, err
    config = json.loads((out / "medusa" / "config.json").read_text())
    assert config["base_model_name_or_path"] == str(out.resolve())
    reference_heads(config).load_state_dict(load_file(out / "medusa" / "medusa_lm_head.safetensors"))
    AutoModelForCausalLM.from_pretrained(out)
    (code, _, err), frozen_dir = runs("frozen")
    code, out_text, err = run_cli("merge", str(frozen_dir), "--out", str(tmp_path / "nothing"))
    assert code != 0 and "nothing to merge" in err and "base: frozen" in err
    assert not (tmp_path / "nothing").exists()


def test_resume_equals_the_uninterrupted_run(tmp_path, tiny_data):
    method = sections(method={**LORA, "projection": "own"})
    (tmp_path / "ref").mkdir()
    code, err, ref_dir = train(tmp_path / "ref", tiny_data, "medusa", **method)
    assert code == 0, err
    code, _, run_dir = train(tmp_path, tiny_data, "medusa", fault="sigterm@step:5", **method)
    assert code == 143
    code, err, run_dir = train(tmp_path, tiny_data, "medusa", "--resume")
    assert code == 0, err
    assert_same_run(ref_dir, run_dir)
    heads = [load_file(d / "final" / "medusa_lm_head.safetensors") for d in (run_dir, ref_dir)]
    assert heads[0].keys() == heads[1].keys() and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


@pytest.mark.parametrize(
    ("method", "extra", "key"),
    [
        ({"name": "medusa", "heads": 0}, {}, "method.heads"),
        ({"name": "medusa", "decay": 0}, {}, "method.decay"),
        ({"name": "medusa", "projection": "tied"}, {}, "method.projection"),
        ({"name": "medusa"}, {"data": {"packing": True}}, "data.packing"),
        ({"name": "medusa"}, {"objective": {"name": "dpo"}}, "objective.name"),
    ],
)
def test_bad_input_exits_2_before_the_run_dir(tmp_path, tiny_data, method, extra, key):
    recipe = make_recipe(tmp_path, tiny_data, method=method, **extra)
    code, out, err = run_cli("train", str(recipe))
    assert (code, out) == (2, "")
    assert key in err
    assert not (tmp_path / "runs").exists()


def test_generate_refuses_sampling(runs):
    (code, _, err), run_dir = runs("frozen")
    code, out, err = run_cli("generate", str(run_dir), "--prompt", "x", "--temperature", "0.7")
    assert code == 2 and "--temperature" in err


@pytest.mark.slow  # the worked recipes (tiny-llama, then SmolLM2), cut to two steps: ~60 s of CPU
def test_docs_medusa_commands_run(tmp_path, monkeypatch):
    """docs/medusa.md's commands, the training cut to two steps on eight rows."""
    root = Path(__file__).resolve().parents[2]
    page = (root / "docs" / "medusa.md").read_text()
    commands = [line.split() for line in page.splitlines() if line.startswith("ftkit ")]
    assert [c[:2] for c in commands] == [
        ["ftkit", "train"],
        ["ftkit", "generate"],
        ["ftkit", "eval"],
        ["ftkit", "methods"],
        ["ftkit", "train"],  # the measured Medusa-2 recipe on SmolLM2
        ["ftkit", "eval"],
    ]
    monkeypatch.chdir(root)
    run = tmp_path / "medusa"
    short = ["--set", "train.max_steps=2", "--set", "data.max_samples=8", "--output-dir", str(run)]
    code, out, err = run_cli(*commands[0][1:], *short)
    assert (code, out) == (0, ""), err
    prompt = page.split('--prompt "')[1].split('"')[0]
    code, out, err = run_cli("generate", str(run), "--prompt", prompt, "--max-new-tokens", "8")
    assert code == 0 and out.endswith("\n"), err
    code, out, err = run_cli("eval", str(run), "--max-samples", "2", "--max-new-tokens", "8")
    assert code == 0 and "tokens_per_forward" in err, err
    code, out, err = run_cli(*commands[3][1:])
    assert code == 0 and "base: lora only" in out and "base: frozen has nothing to merge" in out
    real = tmp_path / "medusa-real"
    code, out, err = run_cli(*commands[4][1:3], "--set", "train.max_steps=2", "--output-dir", str(real))
    assert (code, out) == (0, ""), err
    code, out, err = run_cli("eval", str(real), "--max-samples", "2", "--max-new-tokens", "8")
    assert code == 0 and "tokens_per_forward" in err, err


@pytest.mark.slow  # greedy answers generated before training, then a kill and a resume: ~15 s of CPU
def test_self_distill_trains_on_the_base_s_own_greedy_answers(tmp_path, tiny_data):
    recipe = {
        "method": {**FROZEN, "self_distill": True},
        "data": {"max_samples": 4, "max_length": 48},
        "train": {"max_steps": 3, "batch_size": 2, "samples": 0, "save_every": 1},
    }
    make_recipe(tmp_path, tiny_data, name="distill", **recipe)
    code, err, run_dir = train(tmp_path, tiny_data, "distill", fault="sigterm@step:2")
    assert code == 143
    assert "self-distillation: generating the base's answers to 4 prompts" in err
    rows = [json.loads(line) for line in (run_dir / "medusa_self_distill.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base", dtype=torch.float32)
    prompt = torch.tensor([rows[0]["prompt"]])
    greedy = base.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=48 - prompt.shape[1], do_sample=False
    )[0, prompt.shape[1] :].tolist()
    answer = rows[0]["answer"]  # generated in a left-padded batch, to the batch's budget: a prefix of greedy's
    assert answer and answer == greedy[: len(answer)]
    code, err, _ = train(tmp_path, tiny_data, "distill", "--resume")  # reads the answers back
    assert code == 0, err
    assert "self-distillation" not in err
