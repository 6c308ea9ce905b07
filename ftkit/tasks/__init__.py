"""Tasks: what differs between SFT, preference tuning and classification, behind one seam.

Tasks are the twin of methods. A method decides *which weights* train; a task decides
*what they learn from*: how a batch becomes a loss, what evaluation measures, what a
prediction is, and what the report says about it. The loop, eval, generate, merge and the
report ask the task; none of them branches on `recipe.task`.

    causal_lm       next-token cross-entropy on the answer tokens (objective sft)
    preference      dpo / ipo / orpo / simpo on chosen/rejected pairs (a causal LM)
    grpo            online RL: sampled completions of prompts, scored by verifiable rewards (a causal LM)
    classification  cross-entropy over labels, from a sequence-classification head

A task provides (see `Task`): `objective(...)` for training, `scoring_objective(recipe)`
for methods that score layers, `score(...)` / `synthetic_examples(...)` for merge
verification, `evaluate(...)` for `ftkit eval`, `predict(...)` for `ftkit generate`,
`generates_text`, and the report's `summarize(records, facts)` / `report_section(...)`.

    task_for(recipe)          the task a recipe trains (`ftkit train`)
    task_of(target)           the task of a model to load (a run's, else a classifier's or a causal LM's)
    measuring_task(target, f) the task that measures that model on rows of data format f (`ftkit eval`)
    task_of_run(facts)        the task of a finished run, from its summary facts (the report)

Adding a task (reward modelling, say) is one module and one line in `TASKS`: a class with
the attributes and methods of `Task`: its data format(s) in `data_formats` (a new row format
is a reader in ftkit.data), its objective (collate / units / loss_sum, see objective.py),
what `ftkit eval` measures and `ftkit generate` prints, and its summary.json / report.md
section. `task_name` then says which recipes train it. Nothing in the loop, the commands
or the report changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from ftkit.errors import ArgumentError
from ftkit.models.target import Target
from ftkit.recipe.schema import Recipe
from ftkit.tasks.causal_lm import CausalLMTask
from ftkit.tasks.classification import ClassificationTask
from ftkit.tasks.evaluation import EvalOptions, EvalSet, Evaluation
from ftkit.tasks.grpo import GRPOTask
from ftkit.tasks.objective import Objective
from ftkit.tasks.prediction import Inputs, PredictOptions
from ftkit.tasks.preference import PreferenceTask


class Task(Protocol):
    """What a task provides to training, evaluation and the report."""

    #: registry key, also written to summary.json's facts as `task`
    name: str
    #: True when the model writes text (samples in report.md, exact match, `ftkit generate`)
    generates_text: bool
    #: the key of this task's section in summary.json (None: no section of its own)
    summary_key: str | None
    #: what its model is, in words ("causal LM", "classifier"); tasks of one kind measure each other's models
    model_kind: str
    #: the data formats (`data.format`) it reads, its default first
    data_formats: tuple[str, ...]

    def objective(
        self, recipe: Recipe, model: Any, splits: Any, run_dir: Path, device: Any, pad_id: int
    ) -> tuple[Objective, dict]:
        """The training objective for `model` (the method already applied, before the first step) and
        the facts summary.json records about it. May write its own files into `run_dir`."""
        ...

    def scoring_objective(self, recipe: Recipe) -> Objective:
        """The objective without anything prepared from a model: for short scoring runs inside a method."""
        ...

    def summarize(self, records: list[dict], facts: dict) -> dict | None:
        """This task's figures for summary.json from the logged metrics; None when there are none."""
        ...

    def report_section(self, summary: dict, facts: dict) -> str:
        """report.md's section for this task, from what `summarize` returned."""
        ...

    def synthetic_examples(self, rows: list[list[int]]) -> list[Any]:
        """Random token rows as this task's examples, for checks that need inputs but have no data."""
        ...

    def score(self, model: Any, examples: Sequence[Any], pad_id: int) -> tuple[Any, float]:
        """(the outputs a merged model must reproduce, float32 on the CPU; the loss over `examples`)."""
        ...

    def evaluate(self, target: Target, tokenizer: Any, evalset: EvalSet, options: EvalOptions) -> Evaluation:
        """`ftkit eval`: load `target` (ftkit.models.target.load_model) and measure it on `evalset` (rows of
        one of `data_formats`), and its base too with `options.baseline`; see ftkit.tasks.evaluation."""
        ...

    def predict(
        self, target: Target, tokenizer: Any, inputs: Inputs, options: PredictOptions, out: TextIO
    ) -> list[str]:
        """`ftkit generate`: one prediction per input written to `out` (ftkit.tasks.prediction); return them."""
        ...


TASKS: dict[str, Task] = {
    task.name: task for task in (CausalLMTask(), PreferenceTask(), ClassificationTask(), GRPOTask())
}


def task_name(recipe: Recipe) -> str:
    """The task a recipe trains: classification (recipe.task), preference (a preference objective), grpo
    (objective grpo), else causal_lm."""
    if recipe.task == "classification":
        return "classification"
    if recipe.objective.is_grpo:
        return "grpo"
    return "preference" if recipe.objective.is_preference else "causal_lm"


def task_for(recipe: Recipe) -> Task:
    return TASKS[task_name(recipe)]


def task_of(target: Target) -> Task:
    """The task of a model to load: its run's recipe's, else a classifier's or a causal LM's (`Target.task`)."""
    return task_for(target.recipe) if target.recipe is not None else TASKS[target.task]


def measuring_task(target: Target, fmt: str) -> Task:
    """The task that measures `target` on rows of data format `fmt`: its own task when that reads them, else
    the task of the same kind of model that does (an SFT model on preference pairs: preference; a DPO run on
    alpaca rows: causal_lm). ArgumentError (about --format) when no task reads `fmt` with such a model."""
    own = task_of(target)
    for task in (own, *TASKS.values()):
        if fmt in task.data_formats and task.model_kind == own.model_kind:
            return task
    readable = [f for task in TASKS.values() if task.model_kind == own.model_kind for f in task.data_formats]
    advice = "drop it" if len(readable) == 1 else f"use one of {', '.join(readable)}"
    raise ArgumentError(
        f"--format: {target.spec} is a {own.model_kind}, which reads {' / '.join(readable)} rows, not {fmt}; {advice}"
    )


def task_of_run(facts: dict) -> Task:
    """The task of a finished run, from its summary facts (runs before tasks were recorded: from the objective)."""
    name = facts.get("task")
    if name not in TASKS:
        name = "preference" if facts.get("objective") in PreferenceTask.objectives else "causal_lm"
    return TASKS[name]


__all__ = ["TASKS", "Objective", "Task", "measuring_task", "task_for", "task_name", "task_of", "task_of_run"]
