"""Bad input, exhaustively (issue part 9, RELIABILITY.md R1-R4, R25): hypothesis generates broken
recipes and broken data files and feeds them to `ftkit train` as a user would (in-process CLI).

Every one must give exit 2, nothing on stdout, no traceback, and error lines that each name
where the problem is (`recipe.yaml:LINE: key.path: ...` or `data.jsonl:LINE: ...`), and must
leave no run directory behind. The example counts are bounded (RECIPE_EXAMPLES, DATA_EXAMPLES)
so the suite stays fast; the database is off so every run tries fresh examples of a fixed seed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.support.helpers import make_rows, run_cli

RECIPE_EXAMPLES = 60
DATA_EXAMPLES = 50
SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- recipes ---------------------------------------------------------------------------------

WORDS = st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True)
YAML_WORDS = {"yes", "no", "on", "off", "y", "n", "true", "false", "null"}  # YAML reads these as bool/null
TEXT = WORDS.filter(lambda w: w not in YAML_WORDS)
NOT_A_NUMBER = st.one_of(TEXT, st.lists(st.integers(), max_size=3), st.dictionaries(TEXT, st.integers(), max_size=2))
NOT_A_STRING = st.one_of(st.lists(TEXT, max_size=3), st.dictionaries(TEXT, TEXT, max_size=2), st.integers())

#: (section, key) -> values that must be refused: wrong types and out-of-range values
BAD_VALUES = {
    ("model", "name"): NOT_A_STRING,
    ("model", "dtype"): st.one_of(
        TEXT.filter(lambda w: w not in {"auto", "float32", "bfloat16", "float16"}), st.integers()
    ),
    ("model", "trust_remote_code"): st.one_of(st.lists(st.integers(), min_size=1, max_size=2), st.integers(2, 99)),
    ("method", "r"): st.one_of(NOT_A_NUMBER, st.integers(max_value=0), st.floats(0.1, 0.9)),
    ("method", "alpha"): st.one_of(NOT_A_NUMBER, st.floats(max_value=0, allow_nan=False)),
    ("method", "dropout"): st.one_of(NOT_A_NUMBER, st.floats(min_value=1.0, allow_nan=False, allow_infinity=False)),
    ("method", "target_modules"): st.one_of(
        st.integers(), st.just([]), st.lists(st.integers(), min_size=1, max_size=2)
    ),
    ("data", "train"): NOT_A_STRING,
    ("data", "format"): TEXT.filter(lambda w: w not in {"alpaca", "chat", "text"}),
    ("data", "max_length"): st.one_of(NOT_A_NUMBER, st.integers(max_value=7)),
    ("data", "val_fraction"): st.one_of(
        NOT_A_NUMBER, st.floats(min_value=1.0, allow_nan=False), st.floats(max_value=-0.01)
    ),
    ("train", "lr"): st.one_of(NOT_A_NUMBER, st.floats(max_value=0, allow_nan=False)),
    ("train", "batch_size"): st.one_of(NOT_A_NUMBER, st.integers(max_value=0)),
    ("train", "grad_accum"): st.one_of(NOT_A_NUMBER, st.integers(max_value=0)),
    ("train", "epochs"): st.one_of(NOT_A_NUMBER, st.floats(max_value=0, allow_nan=False)),
    ("train", "optimizer"): TEXT.filter(
        lambda w: w not in {"adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"}
    ),
    ("train", "scheduler"): st.one_of(TEXT.filter(lambda w: w not in {"constant", "linear", "cosine"}), st.just(False)),
    ("train", "warmup_ratio"): st.one_of(NOT_A_NUMBER, st.floats(min_value=1.0, allow_nan=False)),
    ("train", "keep_last"): st.one_of(NOT_A_NUMBER, st.integers(max_value=0)),
    ("train", "betas"): st.one_of(
        st.lists(st.floats(0, 1), max_size=1), st.lists(st.floats(0, 1), min_size=3, max_size=4), TEXT
    ),
    ("train", "on_nonfinite"): TEXT.filter(lambda w: w not in {"stop", "skip"}),
    ("train", "max_skips"): st.one_of(NOT_A_NUMBER, st.integers(max_value=-1)),
}
SECTIONS = ("model", "method", "data", "train")
KNOWN_KEYS = {
    "": {"model", "method", "data", "train", "output_dir"},
    "model": {
        "name",
        "revision",
        "dtype",
        "quantization",
        "trust_remote_code",
        "attn_implementation",
        "gradient_checkpointing",
    },
    "method": {"name", "r", "alpha", "dropout", "bias", "target_modules", "modules_to_save"},
    "data": {"train", "val", "val_fraction", "format", "max_length", "train_on_prompt", "max_samples"},
    "train": set(),  # filled below from the schema
}


def _fill_train_keys() -> None:
    from ftkit.recipe.schema import TrainSection

    KNOWN_KEYS["train"] = set(TrainSection.model_fields)


_fill_train_keys()


def base_recipe(data_dir: Path, out: Path) -> dict:
    return {
        "model": {"name": "builtin:micro-llama"},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "data": {"train": str(data_dir / "train.jsonl"), "max_length": 64},
        "train": {"lr": 1e-3, "max_steps": 2, "batch_size": 4, "samples": 0},
        "output_dir": str(out),
    }


@st.composite
def broken_value(draw) -> tuple[str, object, str]:
    """(key path, bad value, kind)."""
    section, key = draw(st.sampled_from(sorted(BAD_VALUES)))
    return f"{section}.{key}", draw(BAD_VALUES[(section, key)]), "value"


@st.composite
def unknown_key(draw) -> tuple[str, object, str]:
    section = draw(st.sampled_from(("", *SECTIONS)))
    key = draw(TEXT.filter(lambda w: w not in KNOWN_KEYS[section]))
    return (f"{section}.{key}" if section else key), draw(st.one_of(st.integers(), TEXT)), "unknown"


SENTINEL_TAG = "!!python/object/apply:os.system"

#: whole-text traps: (name, function of the valid YAML text and a sentinel path -> broken text)
TEXT_TRAPS = {
    "python tag": lambda text, sentinel: text.replace("lr: 0.001", f'lr: {SENTINEL_TAG} ["touch {sentinel}"]'),
    "custom tag": lambda text, sentinel: text.replace("batch_size: 4", "batch_size: !include other.yaml"),
    "duplicate key": lambda text, sentinel: text.replace("  batch_size: 4\n", "  batch_size: 4\n  batch_size: 8\n"),
    "duplicate section": lambda text, sentinel: text + "train:\n  lr: 0.1\n",
    "bare no": lambda text, sentinel: text.replace("  lr: 0.001\n", "  lr: 0.001\n  scheduler: no\n"),
    "tab indent": lambda text, sentinel: text.replace("  batch_size: 4", "\tbatch_size: 4"),
    "unclosed bracket": lambda text, sentinel: text.replace("  lr: 0.001", "  lr: [0.001"),
    "unclosed quote": lambda text, sentinel: text.replace("  lr: 0.001", '  lr: "0.001'),
    "a list at the top": lambda text, sentinel: "- " + text.replace("\n", "\n  "),
    "a scalar document": lambda text, sentinel: "just some words\n",
    "empty": lambda text, sentinel: "",
    "only comments": lambda text, sentinel: "# nothing here\n",
    "two documents": lambda text, sentinel: text + "---\n" + text,
    "alias bomb": lambda text, sentinel: text.replace(
        "  lr: 0.001", "  lr: &a [x, x]\n  b: &b [*a, *a]\n  c: [*b, *b]"
    ),
}


@st.composite
def text_trap(draw) -> tuple[str, object, str]:
    return draw(st.sampled_from(sorted(TEXT_TRAPS))), None, "text"


def set_path(recipe: dict, path: str, value: object) -> None:
    node = recipe
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value


LINE = re.compile(r"^(?:error: )?(?P<where>[^:]+\.yaml(?::(?P<line>\d+))?|--set [^:]+): (?P<what>.+)$")


@seed(20240601)
@SETTINGS
@given(mutation=st.one_of(broken_value(), unknown_key(), text_trap()), use_set=st.booleans())
def test_broken_recipes_exit_2_with_located_lines(tmp_path_factory, tiny_data, mutation, use_set):
    tmp = tmp_path_factory.mktemp("recipe")
    path, value, kind = mutation
    out = tmp / "run"
    recipe = base_recipe(tiny_data, out)
    args = []
    sentinel = tmp / "sentinel"
    if kind == "text":
        text = TEXT_TRAPS[path](yaml.safe_dump(recipe, sort_keys=False), sentinel)
    elif use_set and kind == "value" and not isinstance(value, dict):
        text = yaml.safe_dump(recipe, sort_keys=False)
        args = ["--set", f"{path}={json.dumps(value)}"]  # JSON is YAML flow syntax
    else:
        set_path(recipe, path, value)
        text = yaml.safe_dump(recipe, sort_keys=False)
    file = tmp / "recipe.yaml"
    file.write_text(text)

    code, stdout, stderr = run_cli("train", str(file), *args)

    assert code == 2, (text, args, stderr)
    assert stdout == ""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert lines, "no error line"
    for line in lines:
        match = LINE.match(line)
        assert match, f"not located: {line!r}"
    if kind in ("value", "unknown"):
        assert any(path in line for line in lines), (path, lines)
        if not args:
            assert all(LINE.match(line)["line"] for line in lines if path in line), lines
    assert not out.exists(), "a run directory was left behind"
    assert not sentinel.exists(), "YAML ran code"


# --- data files ------------------------------------------------------------------------------

GOOD_ROWS = [json.dumps(row) for row in make_rows(12, seed=3)]
JUNK = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
    min_size=1,
    max_size=40,
)


def is_valid_row(line: str) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str)


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def broken_line(draw) -> str:
    """One line that is not a usable alpaca row: junk, non-objects, missing or mistyped fields, no answer."""
    kind = draw(st.sampled_from(["junk", "json", "odd keys", "missing", "mistyped", "empty answer", "huge prompt"]))
    row = json.loads(draw(st.sampled_from(GOOD_ROWS)))
    if kind == "junk":
        return draw(JUNK.filter(lambda s: s.strip() and not is_valid_row(s)))
    if kind == "json":
        return json.dumps(draw(ANY_JSON.filter(lambda v: not (isinstance(v, dict) and is_valid_row(json.dumps(v))))))
    if kind == "odd keys":  # keys with line breaks and control characters end up in the message
        keys = st.text(st.sampled_from("ab\n\r\t\x00\x1b\u2028 "), min_size=1, max_size=6)
        return json.dumps(draw(st.dictionaries(keys, ANY_JSON, min_size=1, max_size=12)))
    if kind == "missing":
        del row[draw(st.sampled_from(["instruction", "output"]))]
    elif kind == "mistyped":
        row[draw(st.sampled_from(["instruction", "output", "input"]))] = draw(
            ANY_JSON.filter(lambda v: v is not None and not isinstance(v, str))
        )
    elif kind == "empty answer":
        row["output"] = draw(st.sampled_from(["", "   ", "\n"]))
    else:  # prompt and answer each longer than max_length: no cut can keep the answer (a long prompt alone
        # loses its start instead, so the answer stays whole)
        row["instruction"] = "x" * draw(st.integers(100, 200_000))
        row["output"] = "y" * draw(st.integers(100, 2_000))
    return json.dumps(row)


@st.composite
def broken_data(draw) -> tuple[bytes, int | None, str]:
    """(file bytes, the 1-based line the error must cite or None for a whole-file error, kind)."""
    kind = draw(st.sampled_from(["line", "line", "line", "empty", "encoding", "array"]))
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n\n", b"   \n\t\n"])), None, kind
    if kind == "encoding":
        index = draw(st.integers(0, len(GOOD_ROWS)))
        rows = list(GOOD_ROWS)
        rows.insert(index, json.dumps({"instruction": "Café", "output": "crème brûlée"}, ensure_ascii=False))
        text = "\n".join(rows) + "\n"
        encoding = draw(st.sampled_from(["latin-1", "utf-16", "cp1252"]))
        return text.encode(encoding), (1 if encoding == "utf-16" else index + 1), kind
    if kind == "array":
        rows = list(GOOD_ROWS)
        index = draw(st.integers(1, len(rows) - 1))
        text = "[\n" + ",\n".join(rows[:index]) + "\n" + ",\n".join(rows[index:]) + "\n]\n"  # one comma missing
        return text.encode(), index + 1, kind
    rows = list(GOOD_ROWS)
    index = draw(st.integers(0, len(rows)))
    rows.insert(index, draw(broken_line()))
    return ("\n".join(rows) + "\n").encode(), index + 1, kind


@seed(20240602)
@SETTINGS
@given(data=broken_data())
def test_broken_data_files_exit_2_naming_file_and_line(tmp_path_factory, tiny_data, data):
    content, line, kind = data
    tmp = tmp_path_factory.mktemp("data")
    train_file = tmp / ("train.json" if kind == "array" else "train.jsonl")
    train_file.write_bytes(content)
    shutil.copy(tiny_data / "val.jsonl", tmp / "val.jsonl")
    out = tmp / "run"
    recipe = base_recipe(tmp, out)
    recipe["data"] |= {"train": str(train_file), "val": str(tmp / "val.jsonl")}
    file = tmp / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe, sort_keys=False))

    code, stdout, stderr = run_cli("train", str(file))

    assert code == 2, (kind, content[:300], stderr)
    assert stdout == "" and "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, lines  # one problem, one line (a newline inside the data must not break it)
    expected = f"error: {train_file}:{line}: " if line is not None else f"error: {train_file}: "
    assert lines[0].startswith(expected), (lines[0], expected)
    assert not out.exists(), "a run directory was left behind"


# --- method- and data-level refusals (issue 15 part 4) ----------------------------------------
# Valid recipes whose method cannot run on this model or this run, and data the task cannot use:
# each is refused with exit 2 before the run directory exists (a next try needs no --overwrite).

LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
NOT_LINEAR = TEXT.filter(lambda w: w not in LINEAR)


@st.composite
def method_refusal(draw) -> tuple[dict, dict, str]:
    """(method section, train overrides, the key the refusal must name) for micro-llama (2 layers), 2 steps."""
    kind = draw(st.sampled_from(["targets", "vera", "ia3", "freeze layers", "freeze modules", "adalora", "delta"]))
    if kind in ("targets", "vera", "ia3"):
        name = {"targets": draw(st.sampled_from(["lora", "dora", "lora_plus", "loha"])), "vera": "vera"}.get(
            kind, "ia3"
        )
        extra = {"r": 4} if name != "ia3" else {"feedforward_modules": []}
        wanted = draw(st.lists(NOT_LINEAR, min_size=1, max_size=2, unique=True))
        return {"name": name, **extra, "target_modules": wanted}, {}, "method.target_modules"
    if kind == "freeze layers":
        return {"name": "freeze", "trainable_layers": draw(st.integers(3, 64))}, {}, "method.trainable_layers"
    if kind == "freeze modules":
        wanted = draw(st.lists(NOT_LINEAR, min_size=1, max_size=2, unique=True))
        return {"name": "freeze", "trainable_modules": wanted}, {}, "method.trainable_modules"
    steps = draw(st.integers(1, 4))
    if kind == "adalora":
        tinit = draw(st.integers(0, steps))
        method = {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": tinit, "tfinal": steps - tinit}
        return method, {"max_steps": steps}, "method.tinit"
    return (
        {"name": "delta_lora", "r": 4, "start_step": draw(st.integers(steps, 10))},
        {"max_steps": steps},
        ("method.start_step"),
    )


@seed(20240603)
@settings(SETTINGS, max_examples=30)
@given(refusal=method_refusal())
def test_method_refusals_exit_2_and_leave_no_run_directory(tmp_path_factory, tiny_data, refusal):
    method, train, key = refusal
    tmp = tmp_path_factory.mktemp("method")
    out = tmp / "run"
    recipe = base_recipe(tiny_data, out)
    recipe["method"] = method
    recipe["train"] |= train
    file = tmp / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe, sort_keys=False))

    code, stdout, stderr = run_cli("train", str(file))

    assert code == 2, (method, train, stderr)
    assert stdout == "" and "Traceback" not in stderr
    assert key in stderr, (key, stderr)
    assert not out.exists(), "a run directory was left behind"


def _classification_refusal(tmp: Path, draw) -> tuple[dict, str]:
    rows = [{"text": f"item {i}", "label": ["a", "b"][i % 2]} for i in range(8)]
    kind = draw(st.sampled_from(["unlisted label", "empty label", "missing text"]))
    index = draw(st.integers(0, len(rows) - 1))
    if kind == "unlisted label":
        rows[index]["label"] = draw(TEXT.filter(lambda w: w not in {"a", "b"}))
    elif kind == "empty label":
        rows[index]["label"] = ""
    else:
        del rows[index]["text"]
    (tmp / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = {"train": str(tmp / "train.jsonl"), "max_length": 64}
    if kind == "unlisted label":
        data["labels"] = ["a", "b"]
    return {"task": "classification", "data": data}, f"train.jsonl:{index + 1}"


def _preference_refusal(tmp: Path, draw) -> tuple[dict, str]:
    rows = [{"prompt": f"say {i}", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(8)]
    index = draw(st.integers(0, len(rows) - 1))
    field = draw(st.sampled_from(["prompt", "chosen", "rejected"]))
    if draw(st.booleans()):
        del rows[index][field]
    else:
        rows[index][field] = ""
    (tmp / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = {"train": str(tmp / "train.jsonl"), "format": "preference", "max_length": 64}
    return {"objective": {"name": draw(st.sampled_from(["dpo", "orpo"]))}, "data": data}, f"train.jsonl:{index + 1}"


@seed(20240604)
@settings(SETTINGS, max_examples=30)
@given(data=st.data())
def test_task_data_refusals_exit_2_and_leave_no_run_directory(tmp_path_factory, tiny_data, data):
    tmp = tmp_path_factory.mktemp("taskdata")
    out = tmp / "run"
    maker = data.draw(st.sampled_from([_classification_refusal, _preference_refusal]))
    sections, where = maker(tmp, data.draw)
    recipe = base_recipe(tiny_data, out) | sections
    file = tmp / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe, sort_keys=False))

    code, stdout, stderr = run_cli("train", str(file))

    assert code == 2, (sections, stderr)
    assert stdout == "" and "Traceback" not in stderr
    assert where in stderr, (where, stderr)
    assert not out.exists(), "a run directory was left behind"
