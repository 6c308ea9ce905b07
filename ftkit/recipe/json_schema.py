"""The recipe's JSON Schema, generated from the pydantic models (`ftkit schema`, docs/recipe.schema.json).

Editors read it to complete and check recipe keys as they are typed: every shipped recipe starts with

    # yaml-language-server: $schema=../docs/recipe.schema.json

which the YAML language server (VS Code's YAML extension, Neovim, Helix, JetBrains) follows. The schema
says what `ftkit validate` says about keys and types (unknown keys, wrong types, out-of-range numbers,
unknown method names: `method` is a union discriminated by `name`); rules that need the whole recipe
(a preference objective needs preference data, ...) stay with `ftkit validate`.

`key_paths()` lists every dotted key the schema knows, for `--set` completion.
"""

from __future__ import annotations

import json
from typing import Any

from ftkit.recipe.schema import Recipe

DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: where the shipped copy lives, relative to the repository root (tests keep it equal to `ftkit schema`)
SHIPPED = "docs/recipe.schema.json"


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe file: sections, keys, types, defaults and descriptions."""
    schema = Recipe.model_json_schema(mode="validation")
    return {"$schema": DIALECT, "title": "ftkit recipe", **schema}


def schema_text() -> str:
    return json.dumps(recipe_schema(), indent=2, ensure_ascii=False) + "\n"


def key_paths() -> list[str]:
    """Every dotted key path of a recipe (`train.lr`, `method.r`, `model.quantization.bits`); the keys of
    all method families under `method.`, each once."""
    schema = recipe_schema()
    paths: list[str] = []
    _walk(schema, schema["$defs"], "", paths)
    return list(dict.fromkeys(paths))


def _walk(node: dict, defs: dict, prefix: str, paths: list[str]) -> None:
    for option in _options(node, defs):
        for key, sub in option.get("properties", {}).items():
            path = f"{prefix}{key}"
            paths.append(path)
            _walk(sub, defs, f"{path}.", paths)


def _options(node: dict, defs: dict) -> list[dict]:
    """The object schemas a property may be: its $ref, or each branch of anyOf / oneOf."""
    if "$ref" in node:
        return _options(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    branches = node.get("anyOf") or node.get("oneOf")
    if branches:
        return [found for branch in branches for found in _options(branch, defs)]
    return [node] if node.get("type") == "object" or "properties" in node else []


def completions(incomplete: str) -> list[str]:
    """Shell completions of a `--set` value: key paths (`train.l` → `train.lr=`), then the values a key
    takes when the schema lists them (`method.name=` → every method; `train.scheduler=c` → cosine ...)."""
    if "=" not in incomplete:
        return [f"{path}=" for path in key_paths() if path.startswith(incomplete)]
    key, _, typed = incomplete.partition("=")
    return [f"{key}={value}" for value in key_values(key) if value.startswith(typed)]


def key_values(path: str) -> list[str]:
    """The values the schema allows at `path` (its enums and consts, true/false for a bool), in order."""
    schema = recipe_schema()
    nodes = [schema]
    for part in path.split("."):
        nodes = [
            o["properties"][part]
            for n in nodes
            for o in _options(n, schema["$defs"])
            if part in o.get("properties", {})
        ]
    values: list[str] = []
    for node in nodes:
        _leaf_values(node, schema["$defs"], values)
    return list(dict.fromkeys(values))


def _leaf_values(node: dict, defs: dict, values: list[str]) -> None:
    if "$ref" in node:
        _leaf_values(defs[node["$ref"].rsplit("/", 1)[-1]], defs, values)
        return
    for branch in node.get("anyOf") or node.get("oneOf") or []:
        _leaf_values(branch, defs, values)
    if isinstance(node.get("items"), dict):  # a list key (train.report_to): the values of its items
        _leaf_values(node["items"], defs, values)
    if "const" in node:
        values.append(_text(node["const"]))
    values += [_text(value) for value in node.get("enum", [])]
    if node.get("type") == "boolean":
        values += ["true", "false"]


def _text(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
