"""`ftkit train`: recipe → data → model → method → optimizer → loop → run directory.

Everything a run writes lands in its run directory (DESIGN.md's contract). Inputs
are checked before the directory is created, so a bad recipe or data file leaves
nothing behind.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError, ModelError, NonFiniteError, RunDirError
from ftkit.recipe.schema import Recipe

#: entries `ftkit train` writes in a run directory (and may therefore replace with --overwrite)
RUN_ENTRIES = (
    "recipe.yaml",
    "metrics.jsonl",
    "checkpoints",
    "final",
    "base",
    "summary.json",
    "loss.png",
    "report.md",
    "samples.jsonl",
)


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty run directory unless --overwrite; then remove only ftkit's own entries."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output_dir: {run_dir} exists and is not a directory")
    existing = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if existing and not overwrite:
        raise RunDirError(
            f"output_dir: {run_dir} is not empty ({', '.join(existing[:5])}{' …' if len(existing) > 5 else ''}); "
            "pass --overwrite to replace ftkit's files there, --resume to continue it, or --output-dir for a new run"
        )
    foreign = [name for name in existing if name not in RUN_ENTRIES and not name.startswith("eval")]
    if existing and foreign:
        print(f"note: --overwrite keeps files ftkit did not make in {run_dir}: {', '.join(foreign)}", file=sys.stderr)
    for name in existing:
        if name in RUN_ENTRIES:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def load_tokenizer(recipe: Recipe) -> Any:
    from ftkit.models import is_builtin, load_tokenizer_only

    if is_builtin(recipe.model.name):
        from ftkit.tokenizer import build_byte_tokenizer

        return build_byte_tokenizer()
    return load_tokenizer_only(recipe.model)


def run_training(recipe: Recipe, overwrite: bool = False, resume: str | None = None) -> dict:
    """Train as `recipe` says; return the summary. Raises FtkitError subclasses on failure."""
    if resume is not None:
        raise RunDirError("--resume is not available yet in this version; start a new run with --output-dir")
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ftkit.data import load_splits
    from ftkit.methods import RunInfo, get_method
    from ftkit.models import build_model, count_parameters, load_model_config
    from ftkit.optim import build_optimizer
    from ftkit.recipe import dump_recipe
    from ftkit.report import write_report
    from ftkit.train.checkpoint import rotate, save_checkpoint, save_weights
    from ftkit.train.loop import Hooks, TrainState, total_steps_for, train_loop
    from ftkit.train.objective import SFT, Regularized
    from ftkit.train.progress import Progress

    run_dir = Path(recipe.output_dir)
    cfg = recipe.train
    started = time.perf_counter()
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.mixed_precision))
    device_type = accelerator.device.type
    set_seed(cfg.seed)

    # Inputs first: a data error must not leave a run directory behind.
    tokenizer = load_tokenizer(recipe)
    splits = load_splits(recipe.data, tokenizer, cfg.seed)
    total_steps = total_steps_for(cfg, len(splits.train))

    method = get_method(recipe.method.name)
    problems = method.model_problems(recipe.method, load_model_config(recipe.model))
    if problems:  # before the run directory and before any weight is loaded
        raise ModelError("\n".join(problems) if len(problems) > 1 else problems[0])

    prepare_run_dir(run_dir, overwrite)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    model, tokenizer, base = build_model(
        recipe.model, device_type, cfg.seed, base_dir=run_dir / "base", tokenizer=tokenizer
    )
    run_info = RunInfo(
        total_steps=total_steps,
        train=cfg,
        examples=splits.train,
        pad_id=tokenizer.pad_token_id,
        device=accelerator.device,
    )
    set_seed(cfg.seed)  # adapter init must not depend on how many random numbers loading drew
    model = method.apply(model, recipe.method, run_info)
    method_hooks = method.hooks(model, recipe.method, run_info)
    trainable, total = count_parameters(model)
    log = _stderr_logger()
    log(
        f"{recipe.model.name} · {recipe.method.name} · trainable {trainable:,} of {total:,} params "
        f"({100 * trainable / max(total, 1):.2f}%) · {len(splits.train)} train / {len(splits.val)} val examples · "
        f"{total_steps} steps · {accelerator.device}"
    )
    if method_hooks.optimizer is not None:
        optimizer = method_hooks.optimizer(cfg)
    else:
        optimizer = build_optimizer(
            method_hooks.param_groups or [p for p in model.parameters() if p.requires_grad], cfg
        )
    objective = Regularized(SFT(), method_hooks.regularizer) if method_hooks.regularizer else SFT()
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()

    metrics = (run_dir / "metrics.jsonl").open("a", buffering=1)  # line-buffered: a crash loses one line at most

    def trainer_state(s: TrainState) -> dict:
        return s.to_dict() | {"total_steps": total_steps}

    def checkpoint(s: TrainState) -> None:
        save_checkpoint(run_dir, accelerator.unwrap_model(model), tokenizer, optimizer, trainer_state(s))
        rotate(run_dir, cfg.keep_last, s.best_step)

    progress = Progress(total_steps)
    hooks = Hooks(
        log=lambda r: (metrics.write(json.dumps(r) + "\n"), progress.update(r)),
        checkpoint=checkpoint,
        before_zero_grad=method_hooks.before_zero_grad,
        after_step=method_hooks.after_step,
    )
    status = "completed"
    try:
        with progress:
            train_loop(
                model,
                optimizer,
                splits.train,
                splits.val,
                cfg,
                total_steps,
                state,
                accelerator,
                tokenizer.pad_token_id,
                hooks,
                objective,
            )
        unwrapped = accelerator.unwrap_model(model)
        _assert_finite(unwrapped)
        if method_hooks.save_final is not None:
            method_hooks.save_final(unwrapped, run_dir / "final")
            tokenizer.save_pretrained(run_dir / "final")
        else:
            save_weights(unwrapped, tokenizer, run_dir / "final")
        if base is not None and recipe.method.is_adapter:
            _point_adapter_to(run_dir / "final", base)
        if cfg.samples and splits.val:
            _write_samples(unwrapped, tokenizer, recipe, run_dir, accelerator.device)
    except NonFiniteError as err:
        status = f"stopped: {err}"
        raise
    finally:
        metrics.close()
        wall_s = time.perf_counter() - started
        facts = {
            "status": status,
            "model": recipe.model.name,
            "method": recipe.method.name,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_pct": 100 * trainable / max(total, 1),
            "train_examples": len(splits.train),
            "val_examples": len(splits.val),
            "truncated": {"train": splits.stats.get("truncated_train", 0), "val": splits.stats.get("truncated_val", 0)},
            "train_target_tokens": splits.stats.get("train_target_tokens"),
            "tokens_seen": state.tokens_seen,
            "steps": state.step,
            "epochs": state.epoch + state.batch_in_epoch / max(1, -(-len(splits.train) // cfg.batch_size)),
            "wall_s": wall_s,
            "tokens_per_s": state.tokens_seen / max(wall_s, 1e-9),
            "peak_mem_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "device": _device_name(accelerator.device),
            "optimizer": cfg.optimizer,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
        }
        summary = write_report(run_dir, facts)
    loss, val_loss = summary.get("final_loss"), summary.get("final_val_loss")
    log(f"done in {wall_s:.0f}s · loss {loss} · val_loss {val_loss} · {run_dir}")
    return summary


def _mixed_precision(name: str) -> str:
    import torch

    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def _assert_finite(model: Any) -> None:
    import torch

    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param).all():
            raise NonFiniteError(f"trainable parameter {name} is not finite; nothing was saved")


def _point_adapter_to(adapter_dir: Path, base: str) -> None:
    """Record where the base lives, so `PeftModel.from_pretrained` needs no guess."""
    config_file = adapter_dir / "adapter_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = base
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def _write_samples(model: Any, tokenizer: Any, recipe: Recipe, run_dir: Path, device: Any) -> None:
    """Greedy completions for the first `train.samples` validation rows, for report.md."""
    import torch

    from ftkit.data import read_rows, render_prompt

    source = recipe.data.val or recipe.data.train
    rows = [row for row, _ in read_rows(source)][: recipe.train.samples]
    model.eval()
    with (run_dir / "samples.jsonl").open("w") as out, torch.no_grad():
        for row in rows:
            prompt, target = render_prompt(row, recipe.data.format, tokenizer)
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
            budget = len(tokenizer(target, add_special_tokens=False).input_ids) + 16
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=budget,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            text = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
            out.write(json.dumps({"prompt": prompt, "target": target, "generated": text.strip()}) + "\n")


def _stderr_logger():
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    return log


__all__ = ["run_training", "prepare_run_dir", "FtkitError"]
