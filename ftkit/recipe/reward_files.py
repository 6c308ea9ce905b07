"""The reward functions a grpo recipe names (`{function: FILE.py:NAME}`): located and checked, never run.

A reward file is a local Python file; its path is relative to the recipe's folder. Here it is only
read and parsed (`ast`), so `ftkit validate` and `ftkit train` refuse a missing file or function
before anything runs or is written; ftkit.tasks.grpo.rewards imports it when training starts.
The path is stored absolute in the recipe, so the run's resolved recipe (and a resume) finds it
from any working directory.
"""

from __future__ import annotations

import ast
from pathlib import Path

from ftkit.recipe.schema import Recipe
from ftkit.recipe.sources import Problem, SourceMap


def resolve_reward_files(recipe: Recipe, recipe_dir: Path, sources: SourceMap) -> list[Problem]:
    """Make every reward function's file absolute (relative to `recipe_dir`) and check that the file
    exists and defines the function at its top level; one problem per reward that does not."""
    problems = []
    for i, spec in enumerate(recipe.objective.rewards):
        if spec.function is None:
            continue
        file_text, name = spec.function.rsplit(":", 1)
        path = Path(file_text).expanduser()
        path = path if path.is_absolute() else (recipe_dir / path)
        key = ("objective", "rewards", i, "function")
        if path.suffix != ".py" or not path.is_file():
            what = "is not a .py file" if path.is_file() else "not found"
            problems.append(
                sources.problem(key, f"{file_text}: {what} ({path}); name a local Python file, relative to the recipe")
            )
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError) as err:
            problems.append(sources.problem(key, f"{file_text} does not parse as Python: {err}"))
            continue
        if name not in top_level_names(tree):
            defined = sorted(n for n in top_level_names(tree) if not n.startswith("_"))
            have = ", ".join(defined[:8]) or "none"
            problems.append(
                sources.problem(key, f"{file_text} defines no function {name!r} at its top level (it defines: {have})")
            )
            continue
        spec.function = f"{path.resolve()}:{name}"
    return problems


def top_level_names(tree: ast.Module) -> set[str]:
    """Functions, classes and assigned names at a module's top level."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
    return names
