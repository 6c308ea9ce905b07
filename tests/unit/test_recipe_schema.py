"""The recipe JSON Schema (`ftkit schema`) agrees with `ftkit validate`: every shipped recipe passes both,
and the unknown keys and wrong types that validate refuses, the schema refuses too (checked with `jsonschema`)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from ftkit.errors import RecipeError
from ftkit.recipe import parse_recipe
from ftkit.recipe.json_schema import SHIPPED, key_paths, recipe_schema, schema_text
from tests.support.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
VALIDATOR = jsonschema.Draft202012Validator(recipe_schema())
BASE = "data: {train: d.jsonl}\n"


def test_the_schema_is_valid_json_schema_and_the_shipped_copy_is_current():
    jsonschema.Draft202012Validator.check_schema(recipe_schema())
    code, out, _ = run_cli("schema")
    assert code == 0 and out == schema_text()
    assert (ROOT / SHIPPED).read_text() == out, "docs/recipe.schema.json is stale: ftkit schema > " + SHIPPED


def test_methods_are_a_union_discriminated_on_name_with_descriptions_and_defaults():
    schema = recipe_schema()
    method = schema["properties"]["method"]
    assert method["discriminator"]["propertyName"] == "name" and "lora" in method["discriminator"]["mapping"]
    lora = schema["$defs"]["LoraConfig"]["properties"]
    assert lora["r"]["default"] == 16 and lora["r"]["description"]
    assert schema["$defs"]["TrainSection"]["additionalProperties"] is False


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_shipped_recipe_points_at_the_schema_and_validates(path):
    text = path.read_text()
    rel = Path(*[".."] * len(path.relative_to(ROOT).parent.parts), SHIPPED)
    assert text.splitlines()[0] == f"# yaml-language-server: $schema={rel.as_posix()}"
    assert (path.parent / rel).resolve() == (ROOT / SHIPPED).resolve()
    errors = [e.message for e in VALIDATOR.iter_errors(yaml.safe_load(text))]
    assert not errors, errors
    parse_recipe(text, str(path))  # and ftkit validate agrees


@pytest.mark.parametrize(
    "text",
    [
        "method: {name: lora, rr: 8}\n",  # unknown key in a method
        "method: {name: lroa}\n",  # unknown method
        "method: {name: lora}\ntrain: {batchsize: 8}\n",  # unknown train key
        "method: {name: lora}\ntrain: {lr: fast}\n",  # wrong type
        "method: {name: lora}\ntrain: {batch_size: 0}\n",  # out of range
        "method: {name: lora, r: 8.5}\n",  # float where an int goes
        "method: {name: vera, target_modules: [q_proj], alpha: 2}\n",  # a key of another method
        "method: {name: lora}\ndata: {train: d.jsonl, format: yaml}\n",  # not one of the formats
        "method: {name: lora}\nmodel: {quantization: {bits: 8}}\n",
        "method: {name: lora}\ntypo_section: {}\n",
    ],
)
def test_what_validate_refuses_the_schema_refuses(text):
    text = text if "data:" in text else text + BASE
    with pytest.raises(RecipeError):
        parse_recipe(text)
    assert list(VALIDATOR.iter_errors(yaml.safe_load(text))), text


def test_key_paths_cover_every_section_and_method_family():
    paths = key_paths()
    for path in ("train.lr", "method.r", "method.init_svd_iters", "model.quantization.bits", "distributed.zero_stage"):
        assert path in paths
    assert len(paths) == len(set(paths))
