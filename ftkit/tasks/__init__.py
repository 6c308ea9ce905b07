"""Tasks: what differs between SFT, preference tuning and classification, behind one seam.

Tasks are the twin of methods. A method decides *which weights* train; a task decides
*what they learn from*: how a batch becomes a loss, what evaluation measures, what a
prediction is, and what the report says about it. The loop, eval, generate, merge and the
report ask the task; none of them branches on `recipe.task`.

    causal_lm       next-token cross-entropy on the answer tokens (objective sft)
    preference      dpo / ipo / orpo / simpo on chosen/rejected pairs (a causal LM)
    classification  cross-entropy over labels, from a sequence-classification head

A task provides (see `Task`): `objective(...)` for training, `scoring_objective(recipe)`
for evaluation and for methods that score layers, `generates_text`, and the report's
`summarize(records, facts)` / `report_section(...)`. Adding a task (reward modelling, say)
is one module with such a class and one line in `TASKS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from ftkit.recipe.schema import Recipe
from ftkit.tasks.causal_lm import CausalLMTask
from ftkit.tasks.classification import ClassificationTask
from ftkit.tasks.objective import Objective
from ftkit.tasks.preference import PreferenceTask


class Task(Protocol):
    """What a task provides to training, evaluation and the report."""

    #: registry key, also written to summary.json's facts as `task`
    name: str
    #: True when the model writes text (samples in report.md, exact match, `ftkit generate`)
    generates_text: bool
    #: the key of this task's section in summary.json (None: no section of its own)
    summary_key: str | None

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


TASKS: dict[str, Task] = {task.name: task for task in (CausalLMTask(), PreferenceTask(), ClassificationTask())}


def task_name(recipe: Recipe) -> str:
    """The task a recipe trains: classification (recipe.task), preference (a preference objective), else causal_lm."""
    if recipe.task == "classification":
        return "classification"
    return "preference" if recipe.objective.is_preference else "causal_lm"


def task_for(recipe: Recipe) -> Task:
    return TASKS[task_name(recipe)]


def task_of_run(facts: dict) -> Task:
    """The task of a finished run, from its summary facts (runs before tasks were recorded: from the objective)."""
    name = facts.get("task")
    if name not in TASKS:
        name = "preference" if facts.get("objective") in PreferenceTask.objectives else "causal_lm"
    return TASKS[name]


__all__ = ["TASKS", "Objective", "Task", "task_for", "task_name", "task_of_run"]
