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
