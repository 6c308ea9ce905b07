"""Shell completion (`ftkit --install-completion`): `--set` completes recipe key paths from the JSON Schema,
then the values the schema lists for that key; `ftkit methods` completes method names."""

from __future__ import annotations

import contextlib
import io

import pytest
import typer

from ftkit.cli import app
from ftkit.methods import REGISTRY
from ftkit.recipe.json_schema import completions, key_values


def test_keys_complete_to_dotted_paths_ready_for_a_value():
    assert completions("train.l") == ["train.lr=", "train.log_every="]
    assert "model.quantization.double_quant=" in completions("model.q")
    assert "method.init_svd_iters=" in completions("method.init")  # a key of one method family (lora)


def test_values_complete_from_the_schema():
    assert completions("method.name=") == [f"method.name={name}" for name in REGISTRY]
    assert completions("train.scheduler=c") == ["train.scheduler=constant", "train.scheduler=cosine"]
    assert completions("model.gradient_checkpointing=") == [
        "model.gradient_checkpointing=true",
        "model.gradient_checkpointing=false",
        "model.gradient_checkpointing=offload",
    ]
    assert completions("train.lr=") == []  # a free number: nothing to offer
    assert completions("no.such.key=") == []
    assert key_values("train.report_to") == ["tensorboard", "mlflow", "wandb"]


@pytest.mark.parametrize(
    ("words", "cword", "expected"),
    [
        ("ftkit train r.yaml --set train.sched", 4, ["train.scheduler="]),
        ("ftkit validate r.yaml --set method.name=q", 4, ["method.name=qlora", "method.name=qdora"]),
        ("ftkit methods lo", 2, ["lora", "lora_plus", "lora_fa", "lora_drop", "longlora", "loha", "lokr"]),
        ("ftkit export run --type b", 4, ["bf16"]),
    ],
)
def test_the_shell_protocol_calls_them(monkeypatch, words, cword, expected):
    """What bash runs on <TAB> once `ftkit --install-completion` installed the hook."""
    monkeypatch.setenv("_FTKIT_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", words)
    monkeypatch.setenv("COMP_CWORD", str(cword))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        typer.main.get_command(app).main([], prog_name="ftkit", complete_var="_FTKIT_COMPLETE")
    assert out.getvalue().split() == expected
