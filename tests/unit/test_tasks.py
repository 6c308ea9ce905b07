"""The task seam: which task a model gets and which measures it on which data, the one classifier test
of a model on disk, left padding through the tokenizer, and what vLLM is told it cannot serve."""

from __future__ import annotations

import io

import pytest
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from ftkit.errors import ArgumentError
from ftkit.models.builtin import build_byte_tokenizer, materialize_builtin
from ftkit.models.load import build_model
from ftkit.models.target import resolve_target
from ftkit.recipe.schema import ModelSection
from ftkit.tasks import TASKS, measuring_task, task_of
from ftkit.tasks.generation import Sampling, generate_batch, vllm_can_serve
from ftkit.tasks.prediction import Inputs, write_predictions


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """builtin:micro-llama as a model directory, and its byte tokenizer."""
    out = tmp_path_factory.mktemp("micro")
    return materialize_builtin("builtin:micro-llama", out, seed=0), build_byte_tokenizer()


def save_adapter(model, config, path):
    get_peft_model(model, config).save_pretrained(path)
    return path


def test_every_task_is_registered_with_the_seam_it_promises():
    for name, task in TASKS.items():
        assert task.name == name and task.data_formats and task.model_kind
        for method in ("objective", "scoring_objective", "score", "synthetic_examples", "evaluate", "predict"):
            assert callable(getattr(task, method)), (name, method)
    formats = [fmt for task in TASKS.values() for fmt in task.data_formats]
    assert len(formats) == len(set(formats))  # a row format belongs to one task


def test_a_model_directory_is_a_causal_lm_or_a_classifier_by_its_config(micro, tmp_path):
    model_dir, _ = micro
    target = resolve_target(model_dir)
    assert not target.is_classifier and task_of(target).name == "causal_lm"
    head = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, id2label={0: "no", 1: "yes"})
    head.save_pretrained(tmp_path / "classifier")
    classifier = resolve_target(tmp_path / "classifier")
    assert classifier.is_classifier and task_of(classifier).name == "classification"
    assert classifier.labels == ["no", "yes"]


def test_an_adapter_is_a_classifier_by_its_peft_task_type(micro, tmp_path):
    model_dir, _ = micro
    cfg = {"r": 2, "target_modules": ["q_proj"]}
    causal, _, _ = build_model(ModelSection(name=str(model_dir)), "cpu", seed=0)
    assert not resolve_target(save_adapter(causal, LoraConfig(**cfg), tmp_path / "lm")).is_classifier
    head, _, _ = build_model(ModelSection(name=str(model_dir)), "cpu", seed=0, labels=["a", "b"])
    adapter = save_adapter(head, LoraConfig(task_type="SEQ_CLS", **cfg), tmp_path / "cls")
    assert resolve_target(adapter).is_classifier


def test_the_data_format_picks_the_measuring_task_among_models_of_one_kind(micro):
    target = resolve_target(micro[0])
    assert measuring_task(target, "alpaca").name == "causal_lm"
    assert measuring_task(target, "preference").name == "preference"  # an SFT model scored on pairs
    with pytest.raises(ArgumentError, match=r"^--format: .* is a causal LM"):
        measuring_task(target, "classification")


def test_left_padding_through_the_tokenizer_keeps_every_row_at_the_end(micro):
    """tokenizer.pad(..., padding_side="left") builds the batch: a row's greedy tokens do not depend on
    the rows beside it (the attention mask hides the padding, transformers derives positions from it)."""
    model_dir, tokenizer = micro
    model, _, _ = build_model(ModelSection(name=str(model_dir)), "cpu", seed=0, tokenizer=tokenizer)
    rows = [[1, 65, 66, 67, 68, 69], [1, 70], [1, 71, 72]]
    together = generate_batch(model.eval(), tokenizer, rows, 6, Sampling())
    alone = [generate_batch(model, tokenizer, [row], 6, Sampling())[0] for row in rows]
    assert together == alone
    assert tokenizer.padding_side == "right"  # the left padding was for this call only


def test_vllm_is_told_which_adapters_it_cannot_serve(micro, tmp_path):
    model_dir, _ = micro

    def target_of(config, name):
        model, _, _ = build_model(ModelSection(name=str(model_dir)), "cpu", seed=0)
        return resolve_target(save_adapter(model, config, tmp_path / name))

    assert vllm_can_serve(target_of(LoraConfig(r=2, target_modules=["q_proj"]), "lora")) is None
    assert "DoRA" in vllm_can_serve(target_of(LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "dora"))
    ia3 = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    assert vllm_can_serve(target_of(ia3, "ia3")) == "vLLM serves plain LoRA adapters, not IA3"
    saved = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert "modules_to_save" in vllm_can_serve(target_of(saved, "saved"))
    assert vllm_can_serve(resolve_target(model_dir)) is None  # a whole model


def test_predictions_are_lines_or_the_rows_given_back():
    out = io.StringIO()
    write_predictions(out, Inputs(["a", "b"], is_jsonl=False, from_prompt=False), ["x", "y"], [{}, {}])
    rows = Inputs([{"id": 1}], is_jsonl=True, from_prompt=False)
    write_predictions(out, rows, ["ignored"], [{"completion": "z"}])
    assert out.getvalue() == 'x\ny\n{"id": 1, "completion": "z"}\n'
