"""What every method family provides: a typed recipe section, `apply`, and optional hooks.

A method module defines a pydantic config class (its `method:` recipe section,
discriminated by `name`) and

    apply(model, config, run: RunInfo) -> model        required: marks what trains
    hooks(model, config, run: RunInfo) -> MethodHooks  optional: what the method adds to a run
    model_problems(config, model_config) -> [str]      optional: what the method needs from the
                                                       model (a transformers config, no weights
                                                       loaded yet), one `key: what to do` line each
    run_problems(config, skeleton, run: RunInfo)       optional: what the method cannot do in this run,
      -> [str]                                         from the model's modules on the meta device (no
                                                       weights) and the run's facts (total steps ...);
                                                       checked before the run directory exists, so a
                                                       refusal leaves nothing behind
    model_config_changes(config, model_config) -> dict optional: config attributes set before the weights
                                                       load (LongLoRA's RoPE scaling); the run's base/
                                                       keeps the changed config

Methods know nothing about the loop; the loop knows nothing about methods. The
registry (`ftkit.methods`) finds `hooks` when a module defines it, and `train/run.py`
wires each member of `MethodHooks` into the one generic place that takes it
(optimizer groups, a loop hook point, the objective, the final save).

Importing this module stays light (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.recipe.methods import MethodConfig

__all__ = ["MethodConfig", "MethodHooks", "RunInfo"]


@dataclass(frozen=True)
class RunInfo:
    """What a method may know about the run it is applied in; filled by `train/run.py`.

    Everything is optional so a method can be applied outside a run (tests, tools);
    a method that needs a field raises ModelError naming it when it is missing.
    """

    total_steps: int | None = None  # optimizer steps the run will take (AdaLoRA's budget schedule)
    train: Any = None  # the recipe's TrainSection (lr, optimizer, betas, seed ...)
    examples: Sequence[Any] = ()  # tokenized training examples (ftkit.data.Example), for data-aware inits
    pad_id: int | None = None  # the tokenizer's pad id, to collate `examples`
    device: Any = None  # torch device the run trains on
    run_dir: Path | None = None  # the run directory (a method may record what it chose there: LoRA-drop's layers)
    resume_from: Path | None = None  # the checkpoint a resumed run continues from; None for a new run
    max_length: int | None = None  # data.max_length: the longest training row in tokens (LongLoRA's group size)
    objective: Any = None  # the task's scoring objective (collate / units / loss_sum), for a method's own short runs
    build_optimizer: Callable[[list, Any], Any] | None = None  # (params, train section) -> the recipe's optimizer
    val_examples: Sequence[Any] = ()  # tokenized validation examples (a method's facts about the val set)


@dataclass
class MethodHooks:
    """What a method adds to a run beyond `apply`; every member is optional.

    param_groups      optimizer parameter groups: dicts with "params" and optionally
                      "lr_scale" (this group's LR = the scheduled LR × lr_scale) and any
                      optimizer option ("weight_decay" ...). Used by every train.optimizer.
    optimizer         `optimizer(train) -> torch.optim.Optimizer` for a method that needs
                      its own update rule (LoRA-FA's projected gradient); the loop still
                      sets each group's LR from the schedule, × "lr_scale".
    before_zero_grad  called as `hook(step)` after `optimizer.step()`, while the gradients
                      of the step are still there (AdaLoRA's importance scores); `step` counts
                      optimizer steps done, this one included (1-based).
    after_step        called as `hook(step)` once the step is complete (gradients cleared).
    regularizer       `regularizer() -> scalar tensor` added once per optimizer step to the
                      training loss (never to evaluation); reported as `reg_loss`.
    save_final        `save_final(model, out_dir)` writes `final/` instead of
                      `model.save_pretrained` (PiSSA/OLoRA convert to a plain LoRA there).
    state             `state() -> {name: tensor}`: what the method keeps besides the trainable
                      weights and the optimizer (Delta-LoRA's frozen snapshot), written in every
                      checkpoint as method_state.safetensors.
    load_state        `load_state(tensors)` on resume, after the weights and the optimizer state
                      are restored, with the tensors `state()` returned at that checkpoint.
    facts             `facts() -> {key: JSON value}`: what the method found out about its trained
                      model (AdapterFusion's weight per adapter on the val set), called once when a
                      run completes, after final/ is saved; summary.json keeps it under
                      facts.method_facts and report.md lists it.
    objective         `objective(task_objective) -> objective`: what the loop minimises instead of the
                      task's objective, built around it (the same collate / units / loss_sum interface,
                      ftkit.tasks.objective), for a method that changes what is learned (Medusa's extra
                      heads). Used for training and for val_loss; refused under fsdp / deepspeed and
                      under ddp with several processes (its loss_sum may bypass the engine's forward,
                      so gradients would not be synchronised): engines.check_method_hooks.
    """

    param_groups: list[dict] | None = None
    optimizer: Callable[[Any], Any] | None = None
    before_zero_grad: list[Callable[[int], None]] = field(default_factory=list)
    after_step: list[Callable[[int], None]] = field(default_factory=list)
    regularizer: Callable[[], Any] | None = None
    save_final: Callable[[Any, Path], None] | None = None
    state: Callable[[], dict[str, Any]] | None = None
    load_state: Callable[[dict[str, Any]], None] | None = None
    facts: Callable[[], dict[str, Any]] | None = None
    objective: Callable[[Any], Any] | None = None
