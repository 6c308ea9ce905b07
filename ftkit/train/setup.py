"""Setting a run up, phase by phase, in the order `run_training` calls them.

    start_accelerator(recipe)          accelerate for recipe.distributed; the seed set
    prepare_inputs(recipe, acc)        tokenizer, splits, packed rows, total steps, data hashes;
                                       kernel / attention / memory checks
    check_model(recipe, inputs, acc)   the method's refusals (model config, skeleton, run facts), and what
                                       it changes in the model's config
    open_run_dir(...)                  a new run directory, or a run reopened at a checkpoint; the recipe written
    build_trainable(...)               base model + method + optimizer, prepared by the engine
    task_objective(...)                what the loop minimises: the task's objective (+ a method's penalty)
    restored_state(...)                a resumed run's weights, optimizer, method state and counters

Everything before `open_run_dir` only reads: a bad recipe or data file leaves no run
directory behind. Random numbers are drawn in a fixed order (the seed is set again right
before the method is applied), which is what lets a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from ftkit.data import Splits, load_splits
from ftkit.data.packing import pack_examples
from ftkit.distributed import collectives, engines
from ftkit.errors import ModelError
from ftkit.io import attach_library_log, messages
from ftkit.methods import MethodHooks, RunInfo, get_method
from ftkit.models.builtin import is_builtin
from ftkit.models.load import (
    build_model,
    check_attention,
    compile_layers,
    count_parameters,
    load_model_config,
    load_tokenizer,
    resolve_dtype,
    skeleton,
)
from ftkit.plan import memory_warning
from ftkit.recipe import dump_recipe
from ftkit.recipe.schema import ModelSection, Recipe
from ftkit.rundir import BASE, LIBRARIES_LOG, RECIPE
from ftkit.tasks import Task
from ftkit.tasks.losses import check_kernels
from ftkit.tasks.objective import Regularized
from ftkit.train import precision
from ftkit.train import resume as resuming
from ftkit.train.checkpoint import load_method_state
from ftkit.train.lock import RunLock, prepare_run_dir
from ftkit.train.loop import TrainState, total_steps_for
from ftkit.train.optim import build_optimizer


def start_accelerator(recipe: Recipe) -> Any:
    """The accelerator for `recipe.distributed`, with every generator seeded from train.seed."""
    accelerator = engines.build_accelerator(recipe, precision.autocast_mode(recipe, precision.device_type()))
    set_seed(recipe.train.seed)
    return accelerator


@dataclass(frozen=True)
class Inputs:
    """What the run trains on, read and checked before anything is written."""

    tokenizer: Any
    splits: Splits
    train_examples: list  # the rows the loop draws from: splits.train, packed when data.packing
    total_steps: int
    data_sha256: dict[str, str | None]  # stored in every checkpoint; a resume compares them


def prepare_inputs(recipe: Recipe, accelerator: Any) -> Inputs:
    """Tokenizer, data splits, packed rows and total steps; then the checks that need no weights."""
    cfg, device_type = recipe.train, accelerator.device.type
    tokenizer = load_tokenizer(recipe.model)
    splits = load_splits(recipe.data, tokenizer, cfg.seed)
    data_sha256 = resuming.data_hashes(recipe.data)
    train_examples = splits.train
    if recipe.data.packing:
        train_examples, _ = pack_examples(splits.train, recipe.data.max_length, cfg.seed)
    total_steps = total_steps_for(cfg, len(train_examples), accelerator.num_processes)
    check_kernels(recipe.perf.kernels, device_type)
    check_attention(recipe.model, device_type)
    precision.check_precision(recipe, device_type)
    warn_if_plan_exceeds_device(recipe, device_type)
    return Inputs(tokenizer, splits, train_examples, total_steps, data_sha256)


def warn_if_plan_exceeds_device(recipe: Recipe, device_type: str) -> None:
    """Before any weight is loaded: warn when `ftkit plan` expects more memory than the GPU has."""
    if device_type != "cuda":
        return
    capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    warning = memory_warning(recipe, capacity)
    if warning:
        print(warning, file=messages())


def check_model(recipe: Recipe, inputs: Inputs, accelerator: Any) -> tuple[Any, dict]:
    """(the recipe's method, the model config changes it asks for); ModelError with every
    problem the method finds in the model's config, on the model's skeleton (meta device) and in
    the run's facts (total steps, max_length). Reads the config only, no weights, writes nothing."""
    method = get_method(recipe.method.name)
    model_config = load_model_config(recipe.model)
    problems = method.model_problems(recipe.method, model_config)
    if not problems:
        model = skeleton(model_config, recipe.model.trust_remote_code, inputs.splits.labels)
        run = RunInfo(
            total_steps=inputs.total_steps,
            train=recipe.train,
            device=accelerator.device,
            max_length=recipe.data.max_length,
        )
        problems = method.run_problems(recipe.method, model, run)
    if problems:
        raise ModelError("\n".join(problems) if len(problems) > 1 else problems[0])
    return method, method.model_config_changes(recipe.method, model_config)


@dataclass(frozen=True)
class RunStart:
    """Where a run starts: a fresh run directory, or the checkpoint a resumed run continues from."""

    resume_from: Path | None = None
    saved: dict = field(default_factory=dict)  # the checkpoint's trainer_state.json; {} for a new run
    created: bool = False  # the run directory was made by this run (a run that cannot start removes it)

    @property
    def resumed_step(self) -> int | None:
        return int(self.saved["step"]) if self.resume_from is not None else None

    @property
    def wall_s(self) -> float:
        """Wall time of the run up to the checkpoint it resumes from."""
        return float(self.saved.get("wall_s", 0.0))


def open_run_dir(
    recipe: Recipe,
    resume: bool | str | Path,
    overwrite: bool,
    lock: RunLock,
    accelerator: Any,
    data_sha256: dict[str, str | None],
    log: Any,
) -> RunStart:
    """Make the run directory ready under `lock` and write the resolved recipe into it.

    A new run: refused when not empty (unless `overwrite`). A resumed run: the checkpoint
    `resume` names (True: the newest complete one), checked, and the run as it stood then.
    """
    run_dir = Path(recipe.output_dir)
    is_main = accelerator.is_main_process  # with N processes only the main one writes the run directory
    start = RunStart()
    if resume:
        resume_from, saved = resuming.reopen(run_dir, resume, recipe, lock, accelerator, data_sha256, log)
        start = RunStart(resume_from, saved)
    elif is_main:
        start = RunStart(created=prepare_run_dir(run_dir, overwrite, lock))
    if is_main:
        attach_library_log(run_dir / LIBRARIES_LOG)
        (run_dir / RECIPE).write_text(dump_recipe(recipe))
    return start


@dataclass(frozen=True)
class Trainable:
    """The model with its method applied, its optimizer, and what the method adds to the run."""

    model: Any  # as the engine prepared it (wrapped, sharded)
    optimizer: Any
    unwrapped: Any  # the model without the engine's wrapper
    tokenizer: Any
    base: str | None  # where the base model lives, recorded in an adapter's config
    hooks: MethodHooks
    trainable_params: int
    total_params: int
    weights: str = ""  # where the trained weights lived, in words (train.master_weights as it ran)


def build_trainable(
    recipe: Recipe,
    accelerator: Any,
    inputs: Inputs,
    method: Any,
    config_changes: dict,
    task: Task,
    resume_from: Path | None,
    log: Any,
) -> Trainable:
    """Load the base model, apply the method, build the optimizer, and let the engine prepare both."""
    cfg, run_dir = recipe.train, Path(recipe.output_dir)
    with accelerator.main_process_first():  # a built-in base is written once, by the main process
        model_cfg = model_source(accelerator, recipe.model, run_dir / BASE)
        model, tokenizer, base = build_model(
            model_cfg,
            accelerator.device.type,
            cfg.seed,
            base_dir=run_dir / BASE,
            tokenizer=inputs.tokenizer,
            labels=inputs.splits.labels,
            config_changes=config_changes,
        )
    run_info = RunInfo(
        total_steps=inputs.total_steps,
        train=cfg,
        examples=inputs.splits.train,
        pad_id=tokenizer.pad_token_id,
        device=accelerator.device,
        run_dir=run_dir,
        resume_from=resume_from,
        max_length=recipe.data.max_length,
        objective=task.scoring_objective(recipe),
        build_optimizer=build_optimizer,
        val_examples=inputs.splits.val,
    )
    set_seed(cfg.seed)  # adapter init must not depend on how many random numbers loading drew
    model = method.apply(model, recipe.method, run_info)
    load_dtype = resolve_dtype(recipe.model.dtype, accelerator.device.type)
    weights = precision.place_trained_weights(model, cfg.master_weights, load_dtype)  # before hooks and optimizer
    hooks = method.hooks(model, recipe.method, run_info)
    engines.check_method_hooks(accelerator, recipe, hooks)
    if recipe.model.torch_compile:
        compile_layers(model)
    trainable, total = count_parameters(model)
    log(describe(recipe, inputs, trainable, total, accelerator))
    if hooks.optimizer is not None:
        optimizer = hooks.optimizer(cfg)
    else:
        optimizer = build_optimizer(hooks.param_groups or [p for p in model.parameters() if p.requires_grad], cfg)
    model, optimizer = engines.prepare(accelerator, recipe, model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    return Trainable(model, optimizer, unwrapped, tokenizer, base, hooks, trainable, total, weights)


def model_source(accelerator: Any, model_cfg: ModelSection, run_base: Path) -> ModelSection:
    """The model section this process loads: a built-in model is written once, by the main
    process, into the run's base/ (transformers saves on rank 0 only); the others load that
    directory. Call inside `accelerator.main_process_first()`."""
    if accelerator.is_main_process or not is_builtin(model_cfg.name):
        return model_cfg
    return model_cfg.model_copy(update={"name": str(run_base)})


def describe(recipe: Recipe, inputs: Inputs, trainable: int, total: int, accelerator: Any) -> str:
    """The run's first line: model, method, trainable share, data, steps, device."""
    splits = inputs.splits
    return (
        f"{recipe.model.name} · {recipe.method.name} · trainable {trainable:,} of {total:,} params "
        f"({100 * trainable / max(total, 1):.2f}%) · {len(splits.train)} train / {len(splits.val)} val examples"
        f"{f' in {len(inputs.train_examples)} packed rows' if recipe.data.packing else ''} · "
        f"{inputs.total_steps} steps · {accelerator.device}{engines.describe(accelerator, recipe)}"
    )


def task_objective(
    recipe: Recipe, task: Task, trainable: Trainable, splits: Splits, accelerator: Any
) -> tuple[Any, dict]:
    """(what the loop minimises, the facts summary.json records about it): the task's objective
    for the model as it starts, plus the method's penalty when it has one."""
    with collectives.own_dir(accelerator, Path(recipe.output_dir)) as where:  # files it writes: the main process's only
        objective, facts = task.objective(
            recipe, trainable.unwrapped, splits, where, accelerator.device, trainable.tokenizer.pad_token_id
        )
    if trainable.hooks.objective is not None:  # a method's own objective around the task's (Medusa)
        objective = trainable.hooks.objective(objective)
    if trainable.hooks.regularizer is not None:
        objective = Regularized(objective, trainable.hooks.regularizer)
    return objective, facts


def restored_state(accelerator: Any, start: RunStart, trainable: Trainable, total_steps: int, log: Any) -> TrainState:
    """Where the loop starts: a new TrainState, or a resumed run's, with the weights, the optimizer
    state and the method's state of its checkpoint loaded (the RNG comes back last, just before the loop)."""
    if start.resume_from is None:
        return TrainState()
    resuming.restore(accelerator, start.resume_from, trainable.model, trainable.optimizer)
    state = resuming.state_from(start.saved)
    if trainable.hooks.load_state is not None:
        trainable.hooks.load_state(load_method_state(start.resume_from))
    log(f"resuming from {start.resume_from}: step {state.step} of {total_steps}, epoch {state.epoch}")
    return state
