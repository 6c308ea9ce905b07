"""What a run shows when stderr is not a terminal: plain lines, thinned in time, numbers for people."""

from __future__ import annotations

import io
import re

import pytest

from ftkit.train.progress import PlainLog, duration, human


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.07771456688642502, "0.07771"),  # the quickstart's old last line printed all 17 digits
        (23456.7, "23,460"),
        (1665.04, "1665"),
        (3e-3, "0.003"),
        (2.987654e-05, "2.988e-05"),
        (5, "5"),
        (1_000_000, "1,000,000"),
        (None, "none"),
        (float("nan"), "nan"),
    ],
)
def test_numbers_have_four_significant_digits(value, shown):
    assert human(value) == shown


def test_durations_read_as_minutes_and_hours():
    assert [duration(s) for s in (4.4, 65, 3600 + 7 * 60 + 30)] == ["4s", "1m05s", "1h07m"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(step: int) -> dict:
    return {
        "step": step,
        "epoch": step / 7,
        "loss": 1 / step,
        "lr": 3e-3,
        "grad_norm": 0.31234,
        "tokens_per_s": 23456.7,
    }


def _run(total: int, step_s: float, log_every: int, eval_every: int = 0) -> list[tuple[float, str]]:
    """Feed a PlainLog as the loop does; return (clock, line) for every line written."""
    clock, out = Clock(), io.StringIO()
    plain, lines = PlainLog(total, out=out, clock=clock), []
    with plain:
        for step in range(1, total + 1):
            clock.now += step_s
            plain.step(_record(step))
            if step % log_every == 0 or step == total:
                plain.update(_record(step))
            if eval_every and step % eval_every == 0:
                plain.update({"step": step, "epoch": 1.0, "val_loss": 0.123456, "val_ppl": 1.1314})
            new = out.getvalue().splitlines()[len(lines) :]
            lines += [(clock.now, line) for line in new]
    return lines


def _gaps(lines: list[tuple[float, str]]) -> list[float]:
    times = [t for t, line in lines if line.startswith("step ")]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_a_line_per_logged_step_at_most_every_10_seconds():
    lines = _run(total=300, step_s=1.0, log_every=1)
    gaps = _gaps(lines)
    assert min(gaps[:-1]) >= 10  # the last step always gets its line
    assert max(gaps) <= 10  # every logged step is a candidate: the first one 10 s after the last line
    assert lines[-1][1].startswith("step 300/300")
    first = lines[0][1]
    assert first == (
        "step 1/300 · epoch 0.1429 · loss 1 · lr 0.003 · grad_norm 0.3123 · 23,460 tok/s · elapsed 1s · eta 4m59s"
    )


def test_a_line_at_least_every_60_seconds_when_logged_steps_are_rare():
    lines = _run(total=400, step_s=7.0, log_every=100)  # a logged step only every 700 s
    gaps = _gaps(lines)
    assert len(lines) >= 400 * 7 / 63
    assert max(gaps) <= 60 + 7  # one step late at most: the line comes with the next step
    assert min(gaps) >= 7


def test_every_eval_has_its_line():
    lines = _run(total=50, step_s=0.1, log_every=1, eval_every=10)
    evals = [line for _, line in lines if line.startswith("eval")]
    assert evals[0] == "eval at step 10/50 · val_loss 0.1235 · val_ppl 1.131"
    assert len(evals) == 5


def test_numbers_in_lines_have_at_most_four_significant_digits():
    for _, line in _run(total=200, step_s=0.5, log_every=3, eval_every=50):
        for number in re.findall(r"(?<![\w/])[\d.,]+(?:e[-+]\d+)?", line):
            digits = re.sub(r"e[-+]\d+$", "", number).replace(",", "").replace(".", "").lstrip("0")
            assert len(digits.rstrip("0")) <= 4, (number, line)
