"""The `ftkit` command line. Each command is thin: it parses, calls one function, reports.

Imports stay light here (no torch): `ftkit --help` must be instant. Progress and logs
go to stderr; stdout carries only what a command is asked to print (resolved recipe,
--json), so commands compose in shell pipelines.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ftkit import io as stdout
from ftkit.errors import ArgumentError, FtkitError
from ftkit.rundir import RECIPE, is_run_dir
from ftkit.usage import HelpCommand, HelpGroup

app = typer.Typer(
    cls=HelpGroup,
    rich_markup_mode=None,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune language models from YAML recipes.",
)

_state = {"debug": False}


class DataFormat(str, Enum):
    """Row formats `--format` accepts (the recipe's data.format values)."""

    alpaca = "alpaca"
    chat = "chat"
    text = "text"
    preference = "preference"
    classification = "classification"


class GgufType(str, Enum):
    """Tensor types `export --gguf` writes its 2-D weights in (norms stay float32)."""

    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


class Dtype(str, Enum):
    """Weight dtypes of a merged model; auto = bf16 on a bf16 GPU, else fp32."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on failure.")] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="Also show the libraries' own warnings and messages (train keeps them in RUN/logs/libraries.log).",
        ),
    ] = False,
) -> None:
    _state["debug"] = debug
    if verbose:
        stdout.show_library_output()


def _complete_set(incomplete: str) -> list[str]:
    """`--set` completion: recipe key paths, then the values the schema lists for the key."""
    from ftkit.recipe.json_schema import completions

    return completions(incomplete)


def _complete_method(incomplete: str) -> list[str]:
    from ftkit.recipe.json_schema import key_values

    return [name for name in key_values("method.name") if name.startswith(incomplete)]


SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a recipe key: --set train.lr=3e-4 (repeatable).",
        autocompletion=_complete_set,
    ),
]


@app.command(cls=HelpCommand)
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", metavar="RECIPE")],
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            help="With --resume: the checkpoint to continue from (RUN/checkpoints/step-N); "
            "default: the newest complete one.",
            metavar="CHECKPOINT",
            show_default=False,
        ),
    ] = None,
    set_: SetOption = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", metavar="DIR", help="Run directory (overrides output_dir).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing non-empty run directory.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in output_dir from its newest complete checkpoint, or from CHECKPOINT.",
        ),
    ] = False,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            metavar="N",
            min=1,
            help="Start N processes on this machine (one per GPU) through torch.distributed.run; "
            "recipe key distributed.strategy says how they share the model.",
        ),
    ] = None,
) -> None:
    """Train a model as the recipe says; write the run directory.

    Ctrl-C (SIGINT) or SIGTERM finishes the step, saves a checkpoint and exits 130 / 143; --resume continues exactly.
    """
    from ftkit.errors import RunDirError
    from ftkit.recipe import load_recipe

    if checkpoint is not None and not resume:
        raise RunDirError(f"{checkpoint}: a checkpoint is only read with --resume: ftkit train RECIPE --resume PATH")
    resolved = load_recipe(recipe, set_ or [])  # a bad recipe fails here, before any process starts
    if output_dir is not None:
        resolved.output_dir = str(output_dir)
    elif resume and recipe.name == RECIPE and is_run_dir(recipe.parent):
        # a run's own recipe.yaml resumes that run where it is now, even after `cp -r` / `mv`
        resolved.output_dir = str(recipe.parent)
    from ftkit.distributed.launch import launch, needs_launch

    if needs_launch(resolved, nproc):
        sys.exit(launch(nproc or 1, sys.argv[1:]))  # SystemExit: click would swallow typer.Exit
    from ftkit.train.run import run_training

    run_training(resolved, overwrite=overwrite, resume=checkpoint if checkpoint is not None else resume)


@app.command(cls=HelpCommand)
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", metavar="RECIPE")],
    set_: SetOption = None,
) -> None:
    """Print the resolved recipe (defaults filled), or every error in it."""
    from ftkit.recipe import dump_recipe, load_recipe

    stdout.data().write(dump_recipe(load_recipe(recipe, set_ or [])))


@app.command(cls=HelpCommand)
def schema() -> None:
    """Print the recipe JSON Schema (for editor completion and checks).

    Shipped recipes point the YAML language server at docs/recipe.schema.json, a copy of this output.
    """
    from ftkit.recipe.json_schema import schema_text

    stdout.data().write(schema_text())


@app.command(cls=HelpCommand)
def plan(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", metavar="RECIPE")],
    set_: SetOption = None,
    gpu: Annotated[
        str | None,
        typer.Option(
            "--gpu", metavar="NAME", help="h100-80gb, h200, a100-80gb, a100-40gb, l40s, a6000, l4, 4090, 3090, a10, t4."
        ),
    ] = None,
    utilisation: Annotated[
        float,
        typer.Option("--utilisation", metavar="FRACTION", min=0.01, max=1.0, help="Assumed fraction of peak FLOP/s."),
    ] = 0.4,
    json_: Annotated[bool, typer.Option("--json", help="Also print the plan as JSON on stdout.")] = False,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            "--gpus",
            metavar="N",
            min=1,
            help="Processes (GPUs) the run will have; memory per GPU under the recipe's distributed section.",
        ),
    ] = 1,
    gpus_per_node: Annotated[
        int | None,
        typer.Option(
            "--gpus-per-node", metavar="N", min=1, help="For distributed.sharding: hybrid (default: --nproc)."
        ),
    ] = None,
) -> None:
    """Estimate a recipe's peak GPU memory and speed, no weights loaded.

    From the model's config and the recipe's geometry, for the GPU --gpu names.
    """
    from ftkit.plan import estimate, render_table, to_json
    from ftkit.recipe import load_recipe

    resolved = load_recipe(recipe, set_ or [])
    result = estimate(
        resolved, gpu, utilisation, _count_examples(resolved), processes=nproc, gpus_per_node=gpus_per_node
    )
    stdout.messages().write(render_table(result))
    if json_:
        stdout.data().write(to_json(result))


def _count_examples(recipe) -> int | None:
    """Training rows in data.train (for the wall-time estimate), or None when unknown."""
    from ftkit.data import read_rows

    if recipe.train.max_steps is not None or recipe.data.packing or not Path(recipe.data.train).is_file():
        return None
    return min(len(read_rows(recipe.data.train)), recipe.data.max_samples or 1 << 62)


@app.command(cls=HelpCommand)
def methods(
    name: Annotated[
        str | None,
        typer.Argument(help="A method: show its recipe keys.", metavar="NAME", autocompletion=_complete_method),
    ] = None,
    peft_type: Annotated[
        str | None, typer.Argument(help="With `peft`: a peft tuner type, to show its keys.", metavar="TYPE")
    ] = None,
) -> None:
    """List the methods, or one method's recipe keys.

    `ftkit methods` lists them; `ftkit methods vera` shows vera's keys; `ftkit methods peft TYPE` a peft type's.
    """
    from ftkit.methods.catalogue import describe_method, describe_peft_type, list_methods

    if peft_type is not None and name != "peft":
        raise FtkitError(f"methods: a TYPE argument goes with `ftkit methods peft TYPE`, not with {name}")
    if name is None:
        text = list_methods()
    elif peft_type is not None:
        text = describe_peft_type(peft_type)
    else:
        text = describe_method(name)
    stdout.data().write(text)


@app.command(cls=HelpCommand)
def report(run_dir: Annotated[Path, typer.Argument(help="Run directory.", metavar="RUN")]) -> None:
    """(Re)write a run's summary.json, loss.png and report.md.

    From its metrics.jsonl alone.
    """
    from ftkit.report import write_report

    if not (run_dir / "metrics.jsonl").is_file():
        raise FtkitError(f"{run_dir}: no metrics.jsonl here; give the run directory that `ftkit train` wrote")
    write_report(run_dir)
    typer.echo(f"wrote {run_dir / 'report.md'}", file=stdout.messages())


RunOrModel = Annotated[
    str, typer.Argument(help="Run directory, adapter directory, model directory or hub id.", metavar="RUN_OR_MODEL")
]
CheckpointOption = Annotated[
    str | None, typer.Option("--checkpoint", metavar="STEP", help="In a run: use checkpoints/step-N instead of final/.")
]
BaseOption = Annotated[
    str | None,
    typer.Option("--base", metavar="MODEL", help="Base model for an adapter (overrides the one it records)."),
]


@app.command("eval", cls=HelpCommand)
def eval_(
    run_or_model: RunOrModel,
    data: Annotated[
        str | None,
        typer.Option("--data", metavar="FILE", help="Data file (any format train reads); default: the run's val set."),
    ] = None,
    data_format: Annotated[
        DataFormat | None, typer.Option("--format", help="Format of --data (default: the run's).")
    ] = None,
    baseline: Annotated[bool, typer.Option("--baseline", help="Also measure the base model; print the delta.")] = False,
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", metavar="N", min=1, help="Use the first N examples.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", metavar="N", min=1, help="Default: the run's.")
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", metavar="N", min=1, help="Generation budget (default: reference + 16)."),
    ] = None,
    no_generation: Annotated[
        bool, typer.Option("--no-generation", help="Skip generation metrics (loss and accuracy only).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    checkpoint: CheckpointOption = None,
    base: BaseOption = None,
) -> None:
    """Measure a run or model: loss, perplexity, accuracy, exact match.

    On preference pairs: reward accuracy and margins. --baseline compares with its base.
    """
    from ftkit.commands.eval import print_result, run_eval
    from ftkit.models.target import resolve_target

    target = resolve_target(run_or_model, checkpoint, base)
    fmt = data_format.value if data_format is not None else None
    result = run_eval(target, data, fmt, baseline, max_samples, batch_size, not no_generation, max_new_tokens)
    print_result(result, as_json)


@app.command(cls=HelpCommand)
def generate(
    run_or_model: RunOrModel,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", metavar="TEXT", help="One prompt, streamed; without it prompts are read from stdin."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", metavar="N", min=1)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", metavar="T", min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[
        float, typer.Option("--top-p", metavar="P", min=0.0, max=1.0, help="Nucleus sampling mass.")
    ] = 1.0,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Sampling seed.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", min=1, help="Prompts per batch (stdin).")] = 8,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template to plain prompts.")] = False,
    checkpoint: CheckpointOption = None,
    base: BaseOption = None,
) -> None:
    """Complete prompts with a run or model.

    --prompt streams one completion to stdout; without it, stdin lines or JSONL rows in, completions out.
    """
    from ftkit.commands.generate import Sampling, run_generate
    from ftkit.models.target import resolve_target

    target = resolve_target(run_or_model, checkpoint, base)
    run_generate(target, prompt, Sampling(max_new_tokens, temperature, top_p, seed), batch_size, template=not raw)


@app.command(cls=HelpCommand)
def merge(
    run_or_adapter: Annotated[
        str | None,
        typer.Argument(
            help="Run or adapter directory to merge into its base (or use --config).", metavar="RUN_OR_ADAPTER"
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", metavar="DIR", help="Directory for the merged model (required).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            metavar="FILE",
            help="Merge-config YAML: merge models, combine adapters, or build a mixture of experts (method: moe).",
        ),
    ] = None,
    dtype: Annotated[
        Dtype, typer.Option("--dtype", help="Weight dtype of the merged model; auto = bf16 on a bf16 GPU, else fp32.")
    ] = Dtype.auto,
    from_quantized: Annotated[
        bool, typer.Option("--from-quantized", help="QLoRA: merge into the dequantized NF4 weights it trained on.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    samples: Annotated[
        int, typer.Option("--samples", metavar="N", min=1, help="Held-out examples for verification.")
    ] = 8,
    data: Annotated[
        str | None, typer.Option("--data", metavar="FILE", help="Verification data (default: the run's val set).")
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance",
            metavar="X",
            help="Max |Δ logit| merged vs base + adapter, relative to the logits' scale (fp32: 5e-5, bf16: 4e-2).",
        ),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory", metavar="SIZE", help="RAM the merge may use (e.g. 8GB); beyond it, shard by shard."
        ),
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", metavar="SIZE", help="Largest output shard.")
    ] = "2GB",
    checkpoint: CheckpointOption = None,
    base: BaseOption = None,
) -> None:
    """Merge an adapter into its base, verified; or models (--config).

    The merged model is checked against base + adapter on held-out examples before it is written.
    """
    if out is None:
        raise ArgumentError("--out: give the directory for the merged model")
    if (run_or_adapter is None) == (config is None):
        raise ArgumentError("give either RUN_OR_ADAPTER (merge an adapter) or --config (merge models), not both")
    import json

    if config is not None:
        from ftkit.commands.merge_models import load_merge_config, run_merge_config

        result = run_merge_config(load_merge_config(config), out, overwrite=overwrite)
        typer.echo(json.dumps(result["summary"]), file=stdout.messages())
        return
    from ftkit.commands.merge import merge_adapter, parse_size, summary_line
    from ftkit.models.target import resolve_target

    target = resolve_target(run_or_adapter, checkpoint, base)
    report = merge_adapter(
        target,
        out,
        dtype=dtype.value,
        from_quantized=from_quantized,
        overwrite=overwrite,
        samples=samples,
        data=data,
        max_memory=parse_size(max_memory),
        max_shard_size=parse_size(max_shard_size),
        tolerance=tolerance,
    )
    typer.echo(summary_line(report), file=stdout.messages())


@app.command(cls=HelpCommand)
def extract(
    tuned: Annotated[
        str, typer.Option("--tuned", metavar="RUN_OR_MODEL", help="Full fine-tune: run directory or model directory.")
    ],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Directory for the extracted LoRA adapter.")],
    base: Annotated[
        str | None,
        typer.Option("--base", metavar="MODEL", help="The model it was tuned from (default: the run's base)."),
    ] = None,
    rank: Annotated[
        int | None, typer.Option("--rank", metavar="N", min=1, help="Adapter rank (capped per layer).")
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy", metavar="FRACTION", min=0.0, max=1.0, help="Per-layer rank keeping this share of Σ s² instead."
        ),
    ] = None,
    keep_other: Annotated[
        bool, typer.Option("--keep-other", help="Also save changed non-linear modules whole (modules_to_save).")
    ] = False,
    data: Annotated[
        str | None, typer.Option("--data", metavar="FILE", help="Data for the val losses (default: the run's).")
    ] = None,
    max_samples: Annotated[int | None, typer.Option("--max-samples", metavar="N", min=1)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
) -> None:
    """Extract a LoRA adapter from a full fine-tune.

    By SVD of each linear layer's weight delta, at --rank or at the rank keeping --energy.
    """
    from ftkit.commands.extract import extract_lora, print_summary

    report = extract_lora(
        base,
        tuned,
        out,
        rank=rank if rank is not None or energy is not None else 16,
        energy=energy,
        keep_other=keep_other,
        overwrite=overwrite,
        data=data,
        max_samples=max_samples,
    )
    print_summary(report)


@app.command(cls=HelpCommand)
def export(
    run_or_model: RunOrModel,
    gguf: Annotated[
        Path | None,
        typer.Option("--gguf", metavar="FILE", help="The GGUF file to write (llama.cpp, Ollama, LM Studio)."),
    ] = None,
    type_: Annotated[
        GgufType, typer.Option("--type", help="Type of the 2-D weights: f16, bf16, or q8_0 (8-bit blocks).")
    ] = GgufType.f16,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --gguf file.")] = False,
    samples: Annotated[
        int, typer.Option("--samples", metavar="N", min=1, help="Held-out examples the file is verified on.")
    ] = 8,
    data: Annotated[
        str | None, typer.Option("--data", metavar="FILE", help="Verification data (default: the run's val set).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verification report as JSON on stdout.")] = False,
    checkpoint: CheckpointOption = None,
    base: BaseOption = None,
) -> None:
    """Export a run or model as a GGUF file (llama.cpp), verified.

    An adapter is merged first (as `ftkit merge` does, verified). The file is read back with transformers'
    GGUF loader and checked against the merged model (logits and tokenizer) before it is renamed into place.
    """
    if gguf is None:
        raise ArgumentError("--gguf: give the file to write, e.g. --gguf model.gguf")
    import json

    from ftkit.commands.export import export_gguf, summary_line
    from ftkit.models.target import resolve_target

    target = resolve_target(run_or_model, checkpoint, base)
    report = export_gguf(target, gguf, type_.value, overwrite=overwrite, samples=samples, data=data)
    typer.echo(summary_line(report), file=stdout.messages())
    if as_json:
        stdout.data().write(json.dumps(report, indent=2) + "\n")


@app.command(cls=HelpCommand)
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (two or more).", metavar="RUN...")],
    out: Annotated[
        Path | None, typer.Option("--out", metavar="DIR", help="Directory for compare.md, .png, .json (required).")
    ] = None,
    html: Annotated[
        bool, typer.Option("--html", help="Also write compare.html (self-contained, PNG embedded).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table and verdict as JSON on stdout.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", metavar="NAME", help="A name per run for the table, in order (default: folder names)."),
    ] = None,
) -> None:
    """Put runs side by side: loss curves, a table and a verdict.

    Runs must share a task and validation set. The newest `ftkit eval` of each run adds its metrics.
    """
    if out is None:
        raise ArgumentError("--out: give the directory for the comparison, e.g. --out runs/compare")
    import json

    from ftkit.commands.compare import compare_runs, summary_text

    comparison = compare_runs(runs, out, overwrite=overwrite, with_html=html, labels=label)
    stdout.messages().write(summary_text(comparison) + f"wrote {out / 'compare.md'}\n")
    if as_json:
        stdout.data().write(json.dumps(comparison.as_json(), indent=2) + "\n")


@app.command(cls=HelpCommand)
def sweep(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", metavar="RECIPE")],
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            metavar="KEY=VALUES",
            help="A recipe key and its values: --grid train.lr=1e-4,3e-4 (repeatable: every combination runs).",
        ),
    ] = None,
    set_: SetOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Sweep directory: one run per point, then compare.* (default: runs/sweep-RECIPE).",
        ),
    ] = None,
    html: Annotated[bool, typer.Option("--html", help="Also write compare.html.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate every point and print what would run; run nothing.")
    ] = False,
) -> None:
    """Train a grid of recipe values, one run each, then compare.

    Every combination of the --grid values runs, one after another. Completed points are skipped and an
    interrupted one resumes, so running the same command again continues a sweep.
    """
    from ftkit.commands.sweep import plan_sweep, run_sweep

    out = out if out is not None else Path("runs") / f"sweep-{recipe.stem}"
    if dry_run:
        points, _ = plan_sweep(recipe, set_ or [], grid or [], out)
        stdout.data().write("".join(f"{p.action}\t{p.run_dir}\n" for p in points))
        return
    run_sweep(recipe, set_ or [], grid or [], out, with_html=html)


def main() -> None:
    """Entry point: run the app, turning known failures into one stderr line and an exit code."""
    try:
        with _stdout_reserved():
            app(standalone_mode=False)
    except FtkitError as err:
        if _state["debug"]:
            raise
        message = str(err)
        _fail((f"{err.label}: {message}" if "\n" not in message else message), err.exit_code)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("aborted\n")
        sys.exit(130)
    except typer.TyperException as err:  # usage errors (typer's own click): usage, the problem, exit 2
        if not hasattr(err, "show"):
            raise
        err.show()
        sys.exit(err.exit_code)
    except Exception as err:  # the unexpected
        if _state["debug"]:
            raise
        _fail(f"error: {type(err).__name__}: {err} (run with --debug for the traceback)", 1)


def _stdout_reserved():
    """`ftkit.io.reserved()` for a command. Help text, completion scripts and completions (click writes
    them to sys.stdout) stay on stdout."""
    import contextlib
    import os

    argv = sys.argv[1:]
    wants_help = not argv or any(arg in ("--help", "-h", "--install-completion", "--show-completion") for arg in argv)
    completing = any(name.startswith("_") and name.endswith("_COMPLETE") for name in os.environ)
    return contextlib.nullcontext() if wants_help or completing else stdout.reserved()


def _fail(message: str, exit_code: int) -> None:
    """Print the failure (one line) and exit; under several processes the launcher may print it instead."""
    from ftkit.distributed.launch import hand_over_failure

    if not hand_over_failure(message, exit_code):
        sys.stderr.write(message + "\n")
    sys.exit(exit_code)
