"""Recipe loading: safe YAML, precise errors (all at once), --set overrides, the resolved dump.

Covers RELIABILITY.md R1-R5 and R25 for `ftkit validate`. No torch is imported here.
"""

from __future__ import annotations

import importlib.util
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from ftkit.errors import RecipeError
from ftkit.methods import REGISTRY
from ftkit.recipe import dump_recipe, load_recipe, parse_recipe
from ftkit.recipe.schema import Recipe
from ftkit.recipe.yaml_loader import YamlError, load_yaml
from tests.support.helpers import write_file

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = "method: {name: lora}\ndata: {train: data.jsonl}\n"
METHOD_NAMES = ", ".join(REGISTRY)  # registration order: full, freeze, lora, qlora, ...


def recipe_text(body: str) -> str:
    return textwrap.dedent(body).lstrip("\n")


def problems_of(text: str, overrides: tuple[str, ...] = (), source: str = "recipe.yaml") -> list[str]:
    """The problem lines parse_recipe raises for `text` (fails the test if it does not raise)."""
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source, overrides)
    return info.value.problems


def only_problem(text: str, overrides: tuple[str, ...] = ()) -> str:
    problems = problems_of(text, overrides)
    assert len(problems) == 1, problems
    return problems[0]


# --- loading and defaults -------------------------------------------------------------------


def test_minimal_recipe_fills_defaults_and_notes_them():
    recipe = parse_recipe(MINIMAL)
    assert recipe.method.name == "lora"
    assert recipe.train.lr == 1e-4  # the adapter default, chosen by the schema
    assert recipe.output_dir == "runs/recipe"
    assert [note.split(":")[0] for note in recipe.notes] == ["train.lr"]


def test_output_dir_defaults_to_runs_slash_file_stem(tmp_path):
    path = tmp_path / "my-exp.yaml"
    path.write_text(MINIMAL)
    assert load_recipe(path).output_dir == "runs/my-exp"
    path.write_text(MINIMAL + "output_dir: elsewhere/run1\n")
    assert load_recipe(str(path)).output_dir == "elsewhere/run1"


def test_empty_file_reports_the_missing_sections():
    assert problems_of("") == [
        "recipe.yaml:1: method: required key missing",
        "recipe.yaml:1: data: required key missing",
    ]


def test_sections_left_empty_read_as_empty_mappings():
    assert problems_of("method:\ndata:\ntrain:  # every key commented out\n") == [
        f"recipe.yaml:1: method.name: required key missing; one of: {METHOD_NAMES}",
        "recipe.yaml:2: data.train: required key missing",
    ]
    assert parse_recipe(MINIMAL + "model:\ntrain:\n").model.name == "builtin:tiny-llama"


def test_non_text_keys_cite_their_line():
    assert problems_of(MINIMAL + "train:\n  2: x\n  yes: 2\n") == [
        "recipe.yaml:4: train: the integer 2 used as a key; keys are text: quote it",
        "recipe.yaml:5: train: the boolean true used as a key; keys are text: quote it",
    ]


# --- YAML traps (R3, R4) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "value"),
    [("2e-4", 2e-4), ("1e5", 1e5), ("3.0e-4", 3e-4), ("-1E-3", -1e-3), ("+2.5e+2", 250.0), ("3e4", 3e4)],
)
def test_exponent_floats_without_dot_are_floats(token, value):
    loaded = load_yaml(f"x: {token}\n").data["x"]
    assert isinstance(loaded, float) and loaded == value
    recipe = parse_recipe(MINIMAL + f"train: {{lr: {token.lstrip('-+')}}}\n")
    assert isinstance(recipe.train.lr, float) and recipe.train.lr == abs(value)


@pytest.mark.parametrize(
    ("token", "value"), [("'1e5'", "1e5"), ("2e", "2e"), ("e5", "e5"), ("v1e5", "v1e5"), ("42", 42)]
)
def test_look_alikes_keep_their_type(token, value):
    loaded = load_yaml(f"x: {token}\n").data["x"]
    assert loaded == value and type(loaded) is type(value)


def test_duplicate_key_cites_both_lines():
    text = recipe_text(
        """
        method: {name: lora}
        data: {train: data.jsonl}
        train:
          lr: 1.0e-4
          lr: 3.0e-4
        """
    )
    assert only_problem(text) == "recipe.yaml:5: train.lr: duplicate key: given at line 4 and again at line 5; keep one"


def test_merge_keys_may_be_overridden_without_a_duplicate_error():
    text = MINIMAL + "base: &base {lr: 1.0e-4, epochs: 2}\ntrain:\n  <<: *base\n  lr: 3.0e-4\n"
    problems = problems_of(text)  # `base` itself is an unknown top-level key, nothing else
    # (the hint after it names method.base since medusa has that key; the point here is that nothing else is reported)
    (problem,) = problems
    assert problem.startswith("recipe.yaml:3: base: unknown key")


@pytest.mark.parametrize(
    "tagged",
    [
        "!!python/object/apply:os.system ['touch {sentinel}']",
        "!!python/object/new:os.system ['touch {sentinel}']",
        "!!python/name:os.system",
        "!custom {sentinel}",
    ],
)
def test_unsafe_tags_are_refused_and_never_run(tmp_path, tagged):
    sentinel = tmp_path / "pwned"
    text = MINIMAL + "output_dir: " + tagged.format(sentinel=sentinel) + "\n"
    problem = only_problem(text)
    assert not sentinel.exists()
    assert problem.startswith("recipe.yaml:3: tag ") and "not allowed" in problem


@pytest.mark.parametrize("token", ["no", "off", "No"])
def test_bare_yaml_boolean_in_a_literal_field_says_quote_it(token):
    problem = only_problem(MINIMAL + f"train:\n  scheduler: {token}\n")
    assert problem.startswith(
        f"recipe.yaml:4: train.scheduler: got the boolean false from a bare '{token}'; quote it: \"{token}\""
    )
    assert "'constant', 'linear' or 'cosine'" in problem  # "no" is no scheduler either: say what is


def test_bare_no_where_no_is_allowed_just_says_quote_it_and_quoted_no_loads():
    problem = only_problem(MINIMAL + "train: {mixed_precision: no}\n")
    assert problem == "recipe.yaml:3: train.mixed_precision: got the boolean false from a bare 'no'; quote it: \"no\""
    assert parse_recipe(MINIMAL + 'train: {mixed_precision: "no"}\n').train.mixed_precision == "no"


def test_number_where_text_is_expected_says_quote_it():
    problem = only_problem(MINIMAL + "model: {revision: 20240101}\n")
    assert problem == (
        'recipe.yaml:3: model.revision: should be a valid string; got the integer 20240101; quote it: "20240101"'
    )


def test_alias_bomb_is_walked_once_per_node():
    # Nine levels of nine aliases: 9**9 leaves if expanded; must stay instant.
    levels = ["l0: &l0 [a, a, a, a, a, a, a, a, a]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    start = time.perf_counter()
    problems = problems_of(MINIMAL + "\n".join(levels) + "\n")
    assert time.perf_counter() - start < 2.0
    assert len(problems) == 9 and all("unknown key" in p for p in problems)


# --- error format (R1, R2) --------------------------------------------------------------------


def test_unknown_nested_key_cites_line_and_suggests():
    text = recipe_text(
        """
        method:
          name: lora
        data:
          train: data.jsonl
        train:
          lerning_rate: 3.0e-4
        """
    )
    assert only_problem(text) == "recipe.yaml:6: train.lerning_rate: unknown key (did you mean train.lr?)"


@pytest.mark.parametrize(
    ("section", "key", "suggestion"),
    [
        ("method", "lora_r", "method.r"),
        ("method", "lora_alpha", "method.alpha"),
        ("method", "lora_dropout", "method.dropout"),
        ("train", "learning_rate", "train.lr"),
        ("train", "num_epochs", "train.epochs"),
        ("train", "micro_batch_size", "train.batch_size"),
        ("train", "per_device_train_batch_size", "train.batch_size"),
        ("train", "gradient_accumulation_steps", "train.grad_accum"),
        ("train", "lr_scheduler", "train.scheduler"),
        ("train", "warmup", "train.warmup_steps or train.warmup_ratio"),
        ("model", "base_model", "model.name"),
        ("train", "batchsize", "train.batch_size"),  # difflib
        ("method", "alhpa", "method.alpha"),  # difflib inside the chosen method
        ("model", "lr", "train.lr"),  # right name, wrong section
    ],
)
def test_unknown_key_suggestions(section, key, suggestion):
    sections = {"method": {"name": "lora"}, "data": {"train": "data.jsonl"}}
    sections.setdefault(section, {})[key] = 1
    problem = only_problem(yaml.safe_dump(sections, sort_keys=False))
    assert problem.endswith(f"{section}.{key}: unknown key (did you mean {suggestion}?)")


def test_unknown_top_level_key_suggests_the_section():
    assert only_problem(MINIMAL + "trainig: {lr: 1.0e-4}\n") == (
        "recipe.yaml:3: trainig: unknown key (did you mean train?)"
    )


def test_unknown_key_without_a_close_match_lists_the_section_keys():
    problem = only_problem(MINIMAL + "model: {zzz: 1}\n")
    assert problem.startswith("recipe.yaml:3: model.zzz: unknown key; model takes: name, revision, gguf_file, dtype,")


def test_unknown_method_lists_the_known_ones():
    assert only_problem("method: {name: lroa}\ndata: {train: data.jsonl}\n") == (
        f"recipe.yaml:1: method.name: unknown method 'lroa' (did you mean lora?); known: {METHOD_NAMES}"
    )


def test_method_without_name_says_which_names_exist():
    assert only_problem("method: {r: 8}\ndata: {train: data.jsonl}\n") == (
        f"recipe.yaml:1: method.name: required key missing; one of: {METHOD_NAMES}"
    )


def test_method_errors_hide_the_union_tag():
    problem = only_problem("method:\n  name: qlora\n  r: abc\ndata: {train: data.jsonl}\n")
    assert problem.startswith("recipe.yaml:3: method.r: should be a valid integer")
    assert "qlora.r" not in problem


def test_keys_of_another_method_are_unknown_for_this_one():
    problem = only_problem("method: {name: full, r: 8}\ndata: {train: data.jsonl}\n")
    assert problem == (
        "recipe.yaml:1: method.r: unknown key for method full "
        "(it is a key of lora, qlora, dora, qdora, rslora, ..., not of full); method full takes: name"
    )


def test_type_error_shows_received_value_and_type():
    problems = problems_of(MINIMAL + "train:\n  lr: abc\n  batch_size: 1.5\n")
    assert problems == [
        'recipe.yaml:4: train.lr: should be a valid number, unable to parse string as a number; got the string "abc"',
        "recipe.yaml:5: train.batch_size: should be a valid integer, got a number with a fractional part; "
        "got the number 1.5",
    ]


def test_literal_error_lists_allowed_values_and_suggests():
    assert only_problem(MINIMAL + "train: {scheduler: cosin}\n") == (
        "recipe.yaml:3: train.scheduler: should be 'constant', 'linear' or 'cosine'; "
        'got the string "cosin" (did you mean cosine?)'
    )


def test_union_alternatives_become_one_problem():
    assert only_problem("method: {name: lora, target_modules: all}\ndata: {train: data.jsonl}\n") == (
        "recipe.yaml:1: method.target_modules: should be 'all-linear' or a valid list; "
        'got the string "all" (did you mean all-linear?)'
    )


def test_union_member_that_matched_the_container_reports_the_item():
    text = "method:\n  name: lora\n  target_modules:\n    - q_proj\n    - [v_proj]\ndata: {train: data.jsonl}\n"
    assert only_problem(text) == (
        "recipe.yaml:5: method.target_modules[1]: should be a valid string; got the list ['v_proj']"
    )


def test_section_rule_cites_the_section_line():
    text = "method: {name: lora}\ndata:\n  train: a.jsonl\n  val: b.jsonl\n  val_fraction: 0.1\n"
    assert only_problem(text) == "recipe.yaml:2: data: give either data.val or data.val_fraction, not both"


def test_whole_recipe_rule_cites_the_key_it_names():
    text = "model:\n  quantization: {bits: 4}\nmethod:\n  name: full\ndata: {train: data.jsonl}\n"
    assert only_problem(text) == (
        "recipe.yaml:4: method.name: full trains the base weights, which cannot be 4-bit; "
        "remove model.quantization or use method.name: qlora"
    )


def test_missing_required_key_cites_the_parent_mapping():
    assert only_problem("method: {name: lora}\ndata:\n  val: v.jsonl\n") == (
        "recipe.yaml:2: data.train: required key missing"
    )


def test_section_that_is_not_a_mapping():
    assert only_problem("method: lora\ndata: {train: data.jsonl}\n") == (
        'recipe.yaml:1: method: should be a mapping (keys indented below it); got the string "lora"'
    )


def test_every_problem_is_reported_at_once_in_file_order():
    text = recipe_text(
        """
        model:
          dtype: bf16
        method:
          name: lora
          lora_r: 8
        data:
          val: v.jsonl
        train:
          lerning_rate: 3.0e-4
          scheduler: no
        """
    )
    problems = problems_of(text, ("train.epochs=many",))
    assert [p.split(": ")[0] for p in problems] == [
        "recipe.yaml:2",
        "recipe.yaml:5",
        "recipe.yaml:6",
        "recipe.yaml:9",
        "recipe.yaml:10",
        "--set train.epochs=many",
    ]
    for key in ("model.dtype", "method.lora_r", "data.train", "train.lerning_rate", "train.scheduler", "train.epochs"):
        assert any(f": {key}: " in p for p in problems), key


def test_problems_name_the_file_as_given():
    assert problems_of("method: {}\n", source="configs/exp 1.yaml")[0].startswith("configs/exp 1.yaml:1: ")


@pytest.mark.parametrize(
    ("text", "start"),
    [
        ("- method\n- data\n", "recipe.yaml:1: a recipe is a mapping of sections"),
        ("method: {name: lora\ndata: x\n", "recipe.yaml:2: YAML syntax: "),
        ("method:\n\tname: lora\n", "recipe.yaml:2: YAML syntax: "),
        ("a: 1\n---\nb: 2\n", "recipe.yaml:2: YAML syntax: expected a single document"),
    ],
)
def test_unreadable_documents(text, start):
    assert only_problem(text).startswith(start)


def test_tab_indentation_gets_a_hint():
    assert only_problem("method:\n\tname: lora\n").endswith("indent with spaces, not tabs")


def test_missing_file_and_directory(tmp_path):
    for path in (tmp_path / "missing.yaml", tmp_path):
        with pytest.raises(RecipeError) as info:
            load_recipe(path)
        assert info.value.problems[0].startswith(f"{path}: cannot read the recipe: ")
    assert info.value.exit_code == 2


def test_yaml_error_carries_its_line():
    with pytest.raises(YamlError) as info:
        load_yaml("a: [1, 2\nb: 3\n")
    assert info.value.line == 2


# --- --set overrides --------------------------------------------------------------------------


def test_override_values_are_yaml():
    recipe = parse_recipe(MINIMAL, overrides=["train.lr=2e-4", "method.target_modules=[q_proj,v_proj]"])
    assert isinstance(recipe.train.lr, float) and recipe.train.lr == 2e-4
    assert recipe.method.target_modules == ["q_proj", "v_proj"]


def test_override_creates_missing_mappings_and_replaces_file_values():
    text = MINIMAL + "train: {lr: abc}\n"
    recipe = parse_recipe(text, overrides=["model.quantization.type=fp4", "train.lr=1e-3", "train.max_steps=10"])
    assert recipe.model.quantization is not None and recipe.model.quantization.type == "fp4"
    assert recipe.train.lr == 1e-3 and recipe.train.max_steps == 10


def test_override_errors_cite_the_override():
    assert only_problem(MINIMAL, ("train.lr=abc",)) == (
        "--set train.lr=abc: train.lr: should be a valid number, unable to parse string as a number; "
        'got the string "abc"'
    )
    assert only_problem(MINIMAL, ("train.lerning_rate=1",)) == (
        "--set train.lerning_rate=1: train.lerning_rate: unknown key (did you mean train.lr?)"
    )
    assert only_problem(MINIMAL, ("method.name=lroa",)).startswith(
        "--set method.name=lroa: method.name: unknown method 'lroa' (did you mean lora?)"
    )
    assert only_problem(MINIMAL, ("train.scheduler=no",)).startswith(
        "--set train.scheduler=no: train.scheduler: got the boolean false from a bare 'no'; quote it"
    )


def test_override_of_a_method_key_after_switching_method():
    problem = only_problem("method: {name: lora, r: 8}\ndata: {train: data.jsonl}\n", ("method.name=full",))
    assert problem == (
        "recipe.yaml:1: method.r: unknown key for method full "
        "(it is a key of lora, qlora, dora, qdora, rslora, ..., not of full); method full takes: name"
    )


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("train.lr", "--set train.lr: expected key.path=value, e.g. --set train.lr=2e-4"),
        ("=1", "--set =1: '' is not a key path"),
        ("train..lr=1", "--set train..lr=1: 'train..lr' is not a key path"),
        ("train.lr=[1", "--set train.lr=[1: cannot read the value '[1': "),
        (
            "data.train.x=1",
            "--set data.train.x=1: data.train.x: cannot set a key inside data.train: it holds the string",
        ),
    ],
)
def test_malformed_overrides(override, problem):
    assert only_problem(MINIMAL, (override,)).startswith(problem)


# --- the resolved dump (R5) -------------------------------------------------------------------

ROUND_TRIP = {
    "minimal lora": MINIMAL,
    "qlora with list": "method: {name: qlora, target_modules: [q_proj, v_proj], r: 4}\ndata: {train: d.jsonl}\n",
    "full, tiny lr": "method: {name: full}\ndata: {train: d.jsonl, val_fraction: 0.1}\ntrain: {lr: 2e-5}\n",
    "freeze": "method: {name: freeze, trainable_modules: [lm_head]}\ndata: {train: d.jsonl}\n",
    "strings that look like other types": recipe_text(
        """
        model: {name: "1e5", revision: "20240101"}
        method: {name: lora}
        data: {train: "yes", val: "null"}
        train: {mixed_precision: "no", lr: 0.0002, betas: [0.8, 0.95]}
        output_dir: "on"
        """
    ),
}


@pytest.mark.parametrize("text", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_dump_reloads_to_an_equal_recipe(text):
    recipe = parse_recipe(text)
    again = parse_recipe(dump_recipe(recipe))
    assert again.model_dump() == recipe.model_dump()
    assert isinstance(again.train.lr, float)


def test_dump_writes_notes_then_every_key_in_schema_order():
    recipe = parse_recipe(MINIMAL)
    text = dump_recipe(recipe)
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments == [f"# filled by ftkit: {note}" for note in recipe.notes] and len(comments) == 1
    data = yaml.safe_load(text)
    assert list(data) == list(Recipe.model_fields)
    for section in ("model", "data", "train"):
        assert list(data[section]) == list(type(getattr(recipe, section)).model_fields), section
    assert list(data["method"]) == list(type(recipe.method).model_fields)
    assert data["train"]["lr"] == 1e-4 and data["output_dir"] == "runs/recipe"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_and_round_trip(path):
    recipe = load_recipe(path)
    assert parse_recipe(dump_recipe(recipe), str(path)).model_dump() == recipe.model_dump()


# --- the generated recipe reference (docs/recipe.md) -----------------------------------------------------------


def _reference_script():
    spec = importlib.util.spec_from_file_location("gen_recipe_reference", ROOT / "scripts" / "gen_recipe_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_recipe_reference_is_current():
    script = _reference_script()
    assert script.is_page_current(), "run: python scripts/gen_recipe_reference.py"


def test_reference_generator_check_and_write(tmp_path):
    script = _reference_script()
    page = write_file(tmp_path, f"# x\n\n{script.START}\nstale\n{script.END}\n\nafter\n", name="recipe.md")
    assert script.main(["--check", "--page", str(page)]) == 1
    assert script.main(["--page", str(page)]) == 0
    assert script.main(["--check", "--page", str(page)]) == 0
    text = page.read_text()
    assert "stale" not in text and text.endswith(f"{script.END}\n\nafter\n")
    for heading in ("### `model`", "### `train`", "#### `method.name: lora`", "#### `method.name: full`"):
        assert heading in text
    assert "| `lr` | number > 0 \\| null | `null` |" in text
