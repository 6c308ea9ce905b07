"""Data: files → rows → masked, truncated examples → batches, with the real byte tokenizer."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ftkit.data import batch_order, collate, load_splits, read_rows, render_prompt
from ftkit.data.encode import Example, _tokenize_pieces, _tokenize_spans
from ftkit.data.formats import render_chat
from ftkit.errors import DataError
from ftkit.models.builtin import build_byte_tokenizer
from ftkit.recipe.schema import DataSection

ALPACA = [
    {"instruction": "Add.", "input": "2+2", "output": "4"},
    {"instruction": "Greet.", "output": "hello", "system": "Be kind."},
]
CHAT = {
    "messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
}


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def chatml_tok():
    """The byte tokenizer without a chat template: the data path falls back to ChatML."""
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load_one(tmp_path, tok, row, **data):
    path = write_jsonl(tmp_path / "train.jsonl", [row])
    return load_splits(DataSection(train=path, **data), tok, seed=0).train[0]


def trained_text(tok, ex: Example) -> str:
    """The trained tokens, decoded, with '|' wherever a run of trained tokens ends."""
    out, previous = [], False
    for token, label in zip(ex.input_ids, ex.labels, strict=True):
        if label != -100:
            assert label == token  # a label is the token itself, never shifted
            out.append(tok.decode([token]))
        elif previous:
            out.append("|")
        previous = label != -100
    return "".join(out) + ("|" if previous else "")


# --- masks per format -----------------------------------------------------------------------------------------------


def test_alpaca_trains_only_the_answer_and_its_eos(tmp_path, tok):
    ex = load_one(tmp_path, tok, ALPACA[0])
    assert tok.decode(ex.input_ids) == "<|bos|><|user|>Add.\n\n2+2<|assistant|>4<|eos|>"
    assert trained_text(tok, ex) == "4<|eos|>|"
    assert ex.input_ids[-1] == ex.labels[-1] == tok.eos_token_id
    assert ex.source.endswith("train.jsonl:1")


def test_alpaca_system_and_absent_input(tmp_path, tok):
    ex = load_one(tmp_path, tok, ALPACA[1])
    assert tok.decode(ex.input_ids) == "<|bos|><|system|>Be kind.<|user|>Greet.<|assistant|>hello<|eos|>"
    assert trained_text(tok, ex) == "hello<|eos|>|"


def test_chat_trains_every_assistant_turn_and_nothing_else(tmp_path, tok):
    ex = load_one(tmp_path, tok, CHAT, format="chat")
    assert trained_text(tok, ex) == "a1<|eos|>|a2<|eos|>|"


def test_chat_without_template_uses_chatml_and_appends_a_trained_eos(tmp_path, chatml_tok):
    ex = load_one(tmp_path, chatml_tok, CHAT, format="chat")
    text = chatml_tok.decode(ex.input_ids)
    assert text.startswith("<|bos|><|im_start|>system\nS<|im_end|>\n") and text.endswith("a2<|im_end|>\n<|eos|>")
    assert trained_text(chatml_tok, ex) == "a1<|im_end|>\n|a2<|im_end|>\n<|eos|>|"


def test_text_trains_every_token_after_the_first(tmp_path, tok):
    ex = load_one(tmp_path, tok, {"text": "héllo"}, format="text")
    assert ex.input_ids == [tok.bos_token_id, *"héllo".encode(), tok.eos_token_id]
    # position 0 is predicted by nothing, so it is never a target
    assert ex.labels == [-100, *ex.input_ids[1:]]


def test_train_on_prompt_trains_all_tokens(tmp_path, tok):
    ex = load_one(tmp_path, tok, CHAT, format="chat", train_on_prompt=True)
    assert ex.labels[0] == -100 and ex.labels[1:] == ex.input_ids[1:]


def test_render_prompt_is_the_training_text_up_to_the_answer(tmp_path, tok, chatml_tok):
    for tokenizer in (tok, chatml_tok):
        for row, fmt in ((ALPACA[0], "alpaca"), (CHAT, "chat")):
            ex = load_one(tmp_path, tokenizer, row, format=fmt)
            prompt, reference = render_prompt(row, fmt, tokenizer)
            assert tokenizer.decode(ex.input_ids).startswith(prompt + reference)
            # the prompt ends exactly where the last trained span starts
            prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
            assert ex.labels[len(prompt_ids) - 1] == -100 and ex.labels[len(prompt_ids)] != -100
    prompt, reference = render_prompt({"text": "one two three four"}, "text", tok)
    assert prompt == "<|bos|>one two three" and reference == " four"  # cut at the first space after the middle


def test_span_fallback_without_offsets_matches_offsets(tok):
    text, spans = render_chat(CHAT["messages"], tok, "mem:1")
    assert _tokenize_pieces(text, spans, tok) == _tokenize_spans(text, spans, tok)


# --- errors name file:line and the fix -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        ({"instruction": "x", "output": ""}, "alpaca", "nothing to train on: field 'output' is empty"),
        ({"instruction": "x"}, "alpaca", "missing field 'output' (format alpaca needs instruction, output"),
        ({"instruction": "x", "output": 4}, "alpaca", "field 'output' must be a string"),
        ({"text": "x"}, "chat", "field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "x"}]}, "chat", "must end with the assistant message"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "chat", "messages[0] must be"),
        ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "chat", "role tool"),
        ({"output": "x"}, "text", "missing field 'text'"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, tok, row, fmt, message):
    good = {"alpaca": ALPACA[0], "chat": CHAT, "text": {"text": "ok"}}[fmt]
    path = write_jsonl(tmp_path / "train.jsonl", [good, row])
    with pytest.raises(DataError) as err:
        load_splits(DataSection(train=path, format=fmt), tok, seed=0)
    assert str(err.value).startswith(f"{path}:2: ")
    assert message in str(err.value)


def test_truncation_that_removes_the_answer_says_how_to_fix(tmp_path, tok):
    row = {"instruction": "x" * 40, "output": "a much longer answer"}  # the answer alone exceeds max_length
    path = write_jsonl(tmp_path / "train.jsonl", [row])
    with pytest.raises(DataError, match=r"train\.jsonl:1: .*raise data\.max_length \(now 16\) or shorten the prompt"):
        load_splits(DataSection(train=path, max_length=16), tok, seed=0)


def test_a_long_prompt_is_cut_from_its_start_so_the_answer_and_its_eos_stay_whole(tmp_path, tok):
    row = {"instruction": "x" * 40, "output": "answer"}
    splits = load_splits(DataSection(train=write_jsonl(tmp_path / "t.jsonl", [row]), max_length=16), tok, seed=0)
    (example,) = splits.train
    assert len(example.input_ids) == 16 and example.input_ids[-1] == tok.eos_token_id
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    assert tok.decode(trained) == "answer" + tok.eos_token
    assert example.labels[0] == -100 and splits.stats["truncated_train"] == 1


def test_truncation_keeps_the_left_and_is_counted(tmp_path, tok):
    rows = [{"instruction": "q", "output": "a" * 50}, ALPACA[0]]
    splits = load_splits(DataSection(train=write_jsonl(tmp_path / "t.jsonl", rows), max_length=20), tok, seed=0)
    long, short = splits.train
    assert len(long.input_ids) == 20 and long.input_ids[-1] == ord("a")  # cut from the right: EOS went first
    assert splits.stats["truncated_train"] == 1
    assert splits.stats["train_tokens"] == 20 + len(short.input_ids)
    assert splits.stats["train_target_tokens"] == sum(label != -100 for ex in splits.train for label in ex.labels)


def test_malformed_jsonl_line_is_named(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + '{"instruction": "x" "output": "y"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:3: not valid JSON \(Expecting ',' .*fix or remove the line"):
        read_rows(str(path))
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"train\.jsonl:1: expected a JSON object"):
        read_rows(str(path))


def test_missing_file_names_the_recipe_key(tmp_path, tok):
    with pytest.raises(DataError, match="data.train: file not found: nope.jsonl"):
        load_splits(DataSection(train="nope.jsonl"), tok, seed=0)
    train = write_jsonl(tmp_path / "t.jsonl", ALPACA)
    with pytest.raises(DataError, match="data.val: file not found"):
        load_splits(DataSection(train=train, val=str(tmp_path / "v.jsonl")), tok, seed=0)
    with pytest.raises(DataError, match="data.train: unsupported file type '.txt'"):
        load_splits(DataSection(train="t.txt"), tok, seed=0)


def test_prefix_inconsistent_template_is_refused(tmp_path):
    tokenizer = build_byte_tokenizer()
    # writes the number of messages first, so no rendering is a prefix of a longer one
    tokenizer.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match=r"train\.jsonl:1: the chat template is not prefix-consistent at message 2"):
        load_one(tmp_path, tokenizer, CHAT, format="chat")


# --- file types ----------------------------------------------------------------------------------------------------


def test_csv_rows_are_strings_with_line_numbers(tmp_path, tok):
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["Pad it.", "7", "007"])
        writer.writerow(["Quote it.", 'a, "b"', ""])
    rows = read_rows(str(path))
    assert rows[0] == ({"instruction": "Pad it.", "input": "7", "output": "007"}, f"{path}:2")
    assert rows[1][0]["input"] == 'a, "b"' and rows[1][1] == f"{path}:3"
    with pytest.raises(DataError, match=r"train\.csv:3: nothing to train on"):
        load_splits(DataSection(train=str(path)), tok, seed=0)


def test_parquet_and_json_array(tmp_path, tok):
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT, CHAT]), parquet)
    splits = load_splits(DataSection(train=str(parquet), format="chat"), tok, seed=0)
    assert splits.stats["n_train"] == 2 and trained_text(tok, splits.train[1]) == "a1<|eos|>|a2<|eos|>|"
    assert splits.train[1].source == f"{parquet}:2"
    array = tmp_path / "train.json"
    array.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n   "output": "d"}\n]\n')
    assert [source for _, source in read_rows(str(array))] == [f"{array}:2", f"{array}:4"]
    array.write_text('[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "c"}\n]')
    with pytest.raises(DataError, match=r"train\.json:2: not valid JSON"):
        read_rows(str(array))


# --- splits --------------------------------------------------------------------------------------------------------


def numbered_rows(tmp_path, n):
    return write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(n)])


def ids_of(tok, examples):
    return [tok.decode(ex.input_ids) for ex in examples]


def test_val_fraction_is_seeded_and_disjoint(tmp_path, tok):
    path = numbered_rows(tmp_path, 40)

    def split(seed):
        splits = load_splits(DataSection(train=path, val_fraction=0.25), tok, seed=seed)
        return ids_of(tok, splits.train), ids_of(tok, splits.val), splits.stats

    train, val, stats = split(1)
    assert (stats["n_train"], stats["n_val"]) == (30, 10)
    assert not set(train) & set(val) and len(set(train) | set(val)) == 40
    assert split(1)[:2] == (train, val)
    assert split(2)[1] != val  # C(40, 10) splits: two seeds agreeing is practically impossible


def test_max_samples_and_val_file(tmp_path, tok):
    path = numbered_rows(tmp_path, 10)
    val = write_jsonl(tmp_path / "val.jsonl", ALPACA)
    splits = load_splits(DataSection(train=path, val=val, max_samples=3), tok, seed=0)
    assert [ex.source.rsplit(":", 1)[1] for ex in splits.train] == ["1", "2", "3"]
    assert splits.stats["n_val"] == 2 and splits.stats["val_tokens"] == sum(len(ex.input_ids) for ex in splits.val)
    assert load_splits(DataSection(train=path), tok, seed=0).val == []


# --- batches -------------------------------------------------------------------------------------------------------


def test_batch_order_is_a_deterministic_permutation_per_epoch():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    batches = batch_order(lengths, batch_size=8, seed=3, epoch=0)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(1000))
    assert Counter(len(b) for b in batches) == {8: 125}
    assert batch_order(lengths, 8, seed=3, epoch=0) == batches
    assert batch_order(lengths, 8, seed=3, epoch=1) != batches
    assert batch_order(lengths, 8, seed=4, epoch=0) != batches
    # grouping by length: padding is far below that of random batches (~ 1/3 of the max length each)
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert padding < 0.05 * sum(lengths)


def test_batch_order_keeps_the_last_partial_batch():
    batches = batch_order([5] * 10, batch_size=4, seed=0, epoch=0)
    assert sorted(len(b) for b in batches) == [2, 4, 4]
    assert sorted(i for b in batches for i in b) == list(range(10))


def test_collate_pads_right_with_masked_labels():
    examples = [Example([1, 2, 3], [-100, 2, 3], "m:1"), Example([4], [-100], "m:2")]
    batch = collate(examples, pad_id=256)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 256, 256]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]
    assert all(t.dtype.is_floating_point is False for t in batch.values())
