"""Recipes: read a YAML file, apply `--set` overrides, validate, and write the resolved form.

    load_recipe(path, overrides)   file -> Recipe, or RecipeError listing every problem
    parse_recipe(text, source)     the same from text
    dump_recipe(recipe)            Recipe -> resolved YAML (every key, defaults filled)

The schema (`ftkit.recipe.schema`) says what a recipe may hold; this module only gets
text into it and problems out of it. Every problem is one line,
`recipe.yaml:LINE: key.path: what is wrong; what was received (did you mean X?)`, and
all of them are collected before raising, so one run shows every mistake.
Imports stay light: no torch here (`ftkit validate` must be instant).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ValidationError

from ftkit.errors import RecipeError
from ftkit.recipe.diagnostics import problems_from_validation
from ftkit.recipe.overrides import apply_overrides, parse_overrides
from ftkit.recipe.reward_files import resolve_reward_files
from ftkit.recipe.schema import Recipe
from ftkit.recipe.sources import Problem, SourceMap, describe_value, format_path
from ftkit.recipe.yaml_loader import LoadedYaml, YamlError, dump_yaml, load_yaml

__all__ = ["Recipe", "RecipeError", "dump_recipe", "load_recipe", "parse_recipe"]

NOTE_PREFIX = "# filled by ftkit: "


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate the recipe at `path`; raise RecipeError with every problem.

    `output_dir` defaults to `runs/<file stem>`. Problems are cited with `path` as given.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise RecipeError([f"{source}: cannot read the recipe: {reason}"]) from None
    return parse_recipe(text, source, overrides)


def parse_recipe(text: str, source: str = "recipe.yaml", overrides: Sequence[str] = ()) -> Recipe:
    """`load_recipe` for recipe text; `source` names it in problems and gives the output_dir stem."""
    parsed, problems = parse_overrides(overrides)
    try:
        loaded = load_yaml(text)
    except YamlError as err:
        raise RecipeError(
            _lines([Problem(f"{source}:{err.line}", "", err.message, (0, err.line)), *problems])
        ) from None

    sources = SourceMap(source, loaded.root_line, loaded.lines, loaded.tokens)
    problems += _duplicate_key_problems(loaded, sources)
    data = {} if loaded.data is None else loaded.data  # an empty file: report the missing sections
    if not isinstance(data, dict):
        problems.append(_not_a_mapping(data, sources))
        raise RecipeError(_lines(problems))
    problems += apply_overrides(data, parsed, sources)
    _empty_sections_as_mappings(data)

    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems += problems_from_validation(err, Recipe, sources)
    if recipe is not None:  # a grpo recipe's reward files, relative to the recipe's folder
        problems += resolve_reward_files(recipe, Path(source).parent, sources)
    if problems or recipe is None:
        raise RecipeError(_lines(problems))
    _fill_output_dir(recipe, source)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML: every key in schema order, preceded by a comment per default ftkit chose.

    `parse_recipe(dump_recipe(r))` equals `r` (compare `model_dump()`).
    """
    notes = "".join(f"{NOTE_PREFIX}{note}\n" for note in recipe.notes)
    return notes + dump_yaml(recipe.model_dump(mode="json"))


def _fill_output_dir(recipe: Recipe, source: str) -> None:
    # No note for this default: `ftkit train --output-dir` replaces it after loading,
    # and a note naming the old directory would then mislead.
    if recipe.output_dir is None:
        recipe.output_dir = f"runs/{Path(source).stem}"


def _empty_sections_as_mappings(data: dict) -> None:
    """`train:` with every key commented out is YAML null; read it as an empty section.

    Only top-level sections, which are never optional: a null `model.quantization`
    still means "no quantization".
    """
    for name, info in Recipe.model_fields.items():
        is_model = isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
        is_section = is_model or info.discriminator is not None  # `method` is a union of models
        if is_section and name in data and data[name] is None:
            data[name] = {}


def _duplicate_key_problems(loaded: LoadedYaml, sources: SourceMap) -> list[Problem]:
    return [
        Problem(
            f"{sources.file}:{dup.line}",
            format_path(dup.path),
            f"duplicate key: given at line {dup.first_line} and again at line {dup.line}; keep one",
            (0, dup.line),
        )
        for dup in loaded.duplicates
    ]


def _not_a_mapping(data: object, sources: SourceMap) -> Problem:
    return sources.problem(
        (),
        "a recipe is a mapping of sections (model, method, data, objective, train, output_dir); "
        f"got {describe_value(data)}",
    )


def _lines(problems: list[Problem]) -> list[str]:
    """Problem lines in reading order (file by line, then --set), each once."""
    ordered = sorted(problems, key=lambda problem: problem.order)
    return list(dict.fromkeys(str(problem) for problem in ordered))
