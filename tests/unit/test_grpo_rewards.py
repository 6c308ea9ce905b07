"""grpo's rewards and recipe keys: built-in rewards, a user's reward file, and the refusals they make."""

from __future__ import annotations

import pytest

from ftkit.data.prompt_rows import PromptExample
from ftkit.errors import RecipeError
from ftkit.recipe import load_recipe
from ftkit.recipe.schema import RewardSpec
from ftkit.tasks.grpo import rewards as r

ANSWER = "inform(name[Arcane Harbor], release_year[2018], genres[adventure], platforms[Linux])"


def rows(*answers: str | None) -> list[PromptExample]:
    return [PromptExample([1, 2], f"data.jsonl:{i + 1}", "p", {"answer": a, "tag": i}) for i, a in enumerate(answers)]


def test_field_f1():
    assert r.field_f1_score(ANSWER, ANSWER) == 1.0
    two_of_five = "inform(name[Arcane Harbor], release_year[2019])"  # act + name right, year wrong
    # completion fields {act, name, year}: 2 shared; answer has 5: P = 2/3, R = 2/5
    assert r.field_f1_score(two_of_five, ANSWER) == pytest.approx(2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5))
    assert r.field_f1_score("no fields at all", ANSWER) == 0.0
    assert r.field_f1_score(ANSWER.replace("inform", "request"), ANSWER) == pytest.approx(2 * 0.8 * 0.8 / 1.6)


def test_builtins_on_a_batch():
    examples = rows(ANSWER, "42")
    completions = [f"  {ANSWER}\n", '{"a": 1}']
    specs = [
        RewardSpec(name="exact_match"),
        RewardSpec(name="regex", pattern=r"^\s*inform\("),
        RewardSpec(name="json", weight=0.5),
        RewardSpec(name="field_f1"),
    ]
    total, parts = r.score(r.build_rewards(specs), ["p", "p"], completions, examples)
    assert parts == {"exact_match": [1.0, 0.0], "regex": [1.0, 0.0], "json": [0.0, 1.0], "field_f1": [1.0, 0.0]}
    assert total == [3.0, 0.5]


def write_rewards(tmp_path, body: str):
    (tmp_path / "my_rewards.py").write_text(body)
    return tmp_path / "my_rewards.py"


def test_user_function_gets_columns_and_names_the_failing_row(tmp_path):
    path = write_rewards(
        tmp_path,
        "def score(prompts, completions, answer, tag, **kwargs):\n"
        "    if 1 in tag:\n"
        "        raise ValueError('tag 1 cannot be scored')\n"
        "    return [float(len(c)) for c in completions]\n"
        "def short(completions, **kwargs):\n"
        "    return [1.0]\n"
        "def nan(completions, **kwargs):\n"
        "    return [float('nan')] * len(completions)\n",
    )
    ok = r.build_rewards([RewardSpec(function=f"{path}:score", weight=2.0)])
    total, _ = r.score(ok, ["p"], ["abc"], rows("x"))
    assert total == [6.0]
    with pytest.raises(r.RewardError, match=r"reward score raised ValueError: tag 1 cannot be scored on data.jsonl:2"):
        r.score(ok, ["p", "p"], ["a", "b"], rows("x", "y"))
    with pytest.raises(r.RewardError, match=r"returned 1 values for 2 completions \(data.jsonl:1, data.jsonl:2\)"):
        r.score(r.build_rewards([RewardSpec(function=f"{path}:short")]), ["p", "p"], ["a", "b"], rows("x", "y"))
    with pytest.raises(r.RewardError, match=r"returned nan for a completion of data.jsonl:1"):
        r.score(r.build_rewards([RewardSpec(function=f"{path}:nan")]), ["p"], ["a"], rows("x"))
    assert r.RewardError.exit_code == 1


def test_answer_column_is_checked_up_front():
    with pytest.raises(Exception, match=r"data.jsonl:2: reward exact_match compares with the row's 'answer'"):
        r.check_columns(r.build_rewards([RewardSpec(name="exact_match")]), rows("x", None), "data.train")
    r.check_columns(r.build_rewards([RewardSpec(name="json")]), rows(None), "data.train")  # json needs none


RECIPE = """\
method: {name: lora}
data: {train: train.jsonl, format: prompt}
objective:
  name: grpo
  rewards:
    - %s
"""


def test_reward_file_relative_to_the_recipe_and_refusals(tmp_path):
    write_rewards(tmp_path, "def score(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    (tmp_path / "ok.yaml").write_text(RECIPE % "{function: my_rewards.py:score, weight: 0.5}")
    recipe = load_recipe(tmp_path / "ok.yaml")
    assert recipe.objective.rewards[0].function == f"{(tmp_path / 'my_rewards.py').resolve()}:score"
    for reward, message in [
        ("{function: missing.py:score}", r"recipe.yaml:6: objective.rewards\[0\].function: missing.py: not found"),
        ("{function: my_rewards.py:nope}", r"my_rewards.py defines no function 'nope' at its top level"),
        ("{name: regex, pattern: '('}", r"is not a regular expression"),
        ("{name: exact_match, function: my_rewards.py:score}", r"give exactly one"),
    ]:
        (tmp_path / "recipe.yaml").write_text(RECIPE % reward)
        with pytest.raises(RecipeError, match=message):
            load_recipe(tmp_path / "recipe.yaml")


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (RECIPE.replace("name: grpo", "name: grpo\n  group_size: 1") % "json", "group_size: should be greater"),
        (RECIPE.replace("format: prompt", "format: alpaca") % "json", "grpo samples its own completions"),
        (
            "task: classification\n" + RECIPE.replace("format: prompt", "format: classification") % "json",
            "objective.name: grpo compares generated answers; a classifier",
        ),  # fmt: skip
        (
            RECIPE.replace("name: grpo", "name: dpo").replace("format: prompt", "format: preference") % "json",
            "objective.rewards: only objective.name grpo uses it, not dpo",
        ),
        (RECIPE.replace("  rewards:\n    - %s\n", ""), "grpo needs at least one reward"),
    ],
)
def test_bad_grpo_recipes(tmp_path, recipe, message):
    (tmp_path / "recipe.yaml").write_text(recipe)
    with pytest.raises(RecipeError, match=message):
        load_recipe(tmp_path / "recipe.yaml")
