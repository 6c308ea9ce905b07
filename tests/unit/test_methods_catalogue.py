"""The method catalogue as a user meets it: `ftkit methods`, the worked recipes, and the errors a
recipe gets for keys of another method, combinations that cannot work, and the generic `peft` entry."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml

from ftkit.errors import RecipeError
from ftkit.methods import REGISTRY
from ftkit.recipe import load_recipe, parse_recipe
from ftkit.recipe.describe import yaml_scalar
from ftkit.recipe.schema import Recipe
from tests.support.methods_table import METHOD_CASES

ROOT = Path(__file__).resolve().parents[2]
METHOD_RECIPES = ROOT / "recipes" / "methods"
DATA = "data: {train: d.jsonl}\n"


def problems_of(text: str) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(textwrap.dedent(text).lstrip("\n"))
    return caught.value.problems


# --- every method is complete: summary, documented keys, a worked recipe, a row in the table ----------


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_method_is_documented_and_tested(name):
    config = REGISTRY[name].config
    assert config.summary and config.__doc__
    assert all(info.description for key, info in config.model_fields.items() if key != "name"), name
    assert (METHOD_RECIPES / f"{name}.yaml").is_file(), f"recipes/methods/{name}.yaml is missing"
    assert name in {case["method"]["name"] for case in METHOD_CASES.values()}, f"no row for {name} in the table"


@pytest.mark.parametrize("path", sorted(METHOD_RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_worked_recipe_validates_and_comments_every_key_with_its_default(path):
    """Each key line says its type and the schema's default (`default X`, or `required`), so the
    comments cannot drift from the schema; the method's own key sets are checked the same way."""
    recipe = load_recipe(path)
    assert recipe.method.name == path.stem
    if recipe.method.name == "moe_router":  # trains the MoE that `ftkit merge` builds (docs/moe.md), on both tasks
        assert recipe.model.name == "runs/moe" and recipe.data.train == "data/moe/train.jsonl"
    else:
        assert recipe.model.name == "builtin:tiny-llama" and recipe.data.train == "data/quickstart/train.jsonl"
    sections = {"model": type(recipe.model), "method": type(recipe.method), "data": type(recipe.data)}
    sections["train"] = type(recipe.train)
    section = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = re.match(r"^(\s*)([a-z_]+):(.*)$", line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent, key, rest = match.groups()
        if not indent:
            section = key
            continue
        assert "#" in rest, f"{path.name}:{number}: {key} has no comment"
        fields = sections[section].model_fields
        if key not in fields:  # a generic peft entry's own keys: described by peft, commented freely
            assert section == "method" and recipe.method.name == "peft", f"{path.name}:{number}: {key}"
            continue
        info = fields[key]
        comment = rest.split("#", 1)[1]
        if key == "name" and section == "method":
            assert "required" in comment
            continue
        default = info.get_default(call_default_factory=True)
        expected = "required" if info.is_required() else f"default {yaml_scalar(default)}"
        assert expected in comment, f"{path.name}:{number}: {key} comment should say {expected!r}"


def test_quickstart_switches_method_by_set():
    for name in ("dora", "rslora", "lora_plus", "lora_fa", "qdora"):
        assert load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"method.name={name}"]).method.name == name
    with pytest.raises(RecipeError) as caught:
        load_recipe(ROOT / "recipes" / "quickstart.yaml", ["method.name=vera"])
    assert any(
        "method.alpha: unknown key for method vera" in p and "method vera takes: name, r," in p
        for p in caught.value.problems
    )


# --- a key of another method, and combinations that cannot work -------------------------------------


def test_key_of_another_method_names_its_owners_and_this_method_s_keys():
    assert problems_of("method: {name: vera, alpha: 16}\n" + DATA) == [
        "recipe.yaml:1: method.alpha: unknown key for method vera (it is a key of lora, qlora, dora, qdora, "
        "rslora, ..., not of vera); method vera takes: name, r, dropout, d_initial, projection_seed, "
        "save_projection, target_modules, modules_to_save"
    ]


def test_synonym_of_a_key_this_method_lacks_is_not_suggested():
    """lora_dropout means method.dropout, which (IA)³ does not have: say so instead of suggesting it."""
    (problem,) = problems_of("method: {name: ia3, lora_dropout: 0.1}\n" + DATA)
    assert "did you mean" not in problem
    assert problem.startswith("recipe.yaml:1: method.lora_dropout: unknown key for method ia3 (method.dropout is a key")
    assert problem.endswith("method ia3 takes: name, target_modules, feedforward_modules, modules_to_save")
    (problem,) = problems_of("method: {name: vera, lora_dropout: 0.1}\n" + DATA)
    assert problem == "recipe.yaml:1: method.lora_dropout: unknown key (did you mean method.dropout?)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("method: {name: qlora, init: pissa}\n", "recipe.yaml:1: method.init: pissa moves part of W"),
        ("method: {name: lora, init: loftq}\n", "recipe.yaml:1: method.init: loftq sets B A to cancel"),
        ("method: {name: qdora, init: loftq}\n", "recipe.yaml:1: method.init: loftq with DoRA is not supported"),
        ("method: {name: dora, init: olora}\n", "recipe.yaml:1: method.init: olora with DoRA is not supported"),
        ("method: {name: lora, init_svd_iters: 4}\n", "recipe.yaml:1: method.init_svd_iters: only used by init pissa"),
        ("method: {name: lora_fa}\ntrain: {optimizer: adamw_8bit}\n", "recipe.yaml:1: method.projected_gradient:"),
        ("method: {name: prompt_tuning, init: text}\n", "recipe.yaml:1: method.init_text: required when"),
        ("method: {name: adalora, init_r: 4, target_r: 8}\n", "recipe.yaml:1: method.target_r: 8 is above init_r 4"),
        ("method: {name: ia3, target_modules: [k_proj], feedforward_modules: [down_proj]}\n", "method.feedforward_"),
    ],
)
def test_combinations_that_cannot_work_are_refused_naming_the_key(text, expected):
    (problem,) = problems_of(text + DATA)
    assert problem.startswith(expected) or expected in problem, problem


def test_a_rule_cites_the_key_s_own_line_and_reports_every_problem():
    problems = problems_of("data: {train: d.jsonl}\nmethod:\n  name: qdora\n  r: 8\n  init: pissa\n")
    assert [p[:38] for p in problems] == [
        "recipe.yaml:5: method.init: pissa move",
        "recipe.yaml:5: method.init: pissa with",
    ]


# --- the generic peft entry ---------------------------------------------------------------------


def test_generic_peft_entry_builds_peft_s_config_with_the_recipe_keys():
    recipe = parse_recipe("method: {name: peft, type: fourierft, n_frequency: 100, scaling: 50.0}\n" + DATA)
    assert recipe.method.options == {"n_frequency": 100, "scaling": 50.0}
    assert recipe.method.mergeable
    assert not parse_recipe("method: {name: peft, type: prefix_tuning}\n" + DATA).method.mergeable
    dumped = Recipe.model_validate(yaml.safe_load(yaml.safe_dump(recipe.model_dump(mode="json"))))
    assert dumped.method.options == recipe.method.options  # the resolved recipe keeps the peft keys


def test_generic_peft_entry_reports_every_bad_key_at_its_line():
    problems = problems_of(
        """
        method:
          name: peft
          type: fourierft
          n_frequncy: 100
          scaling: lots
        data: {train: d.jsonl}
        """
    )
    assert problems[0].startswith(
        "recipe.yaml:4: method.n_frequncy: not a key of peft type fourierft (did you mean n_frequency?); "
        "it takes: n_frequency, scaling, random_loc_seed,"
    )
    assert (
        problems[1].startswith("recipe.yaml:5: method.scaling: should be a valid number")
        and 'got the string "lots"' in problems[1]
    )
    assert len(problems) == 2


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("{name: peft, type: fourirft}", "method.type: unknown peft type 'fourirft' (did you mean fourierft?)"),
        ("{name: peft, type: adalora}", "method.type: adalora cannot run through the generic entry: its rank"),
        ("{name: peft, type: oft, r: 0, oft_block_size: 0}", "method.type: peft rejects these oft settings: Either"),
        ("{name: peft}", "method.type: required key missing"),
    ],
)
def test_generic_peft_entry_errors(method, expected):
    (problem,) = problems_of(f"method: {method}\n" + DATA)
    assert problem.startswith(f"recipe.yaml:1: {expected}"), problem
