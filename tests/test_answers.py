"""The answer rule every verifiable reward shares (klsweep.answers): the last tagged answer,
else the fallback (the last number, the whole completion, or nothing)."""

from __future__ import annotations

import pytest
from reasoning_gym.utils import extract_answer as gym_extract_answer

from klsweep.answers import extract_answer, last_number, numeric_answer, tagged_answer


@pytest.mark.parametrize("text", [
    "<answer>6</answer>", "think <answer> 6 </answer> and <answer>7</answer>",
    "no tag", "<answer>\nmulti\nline\n</answer>", "<answer></answer>", "<answer>open",
])
def test_the_tagged_answer_is_reasoning_gyms_own(text):
    assert tagged_answer(text) == gym_extract_answer(text)


@pytest.mark.parametrize(("text", "number"), [
    ("49 - 97 = -48", "-48"), ("9 + 8 = 17.", "17"), ("5-3", "3"), ("about 1,000 apples", "1,000"),
    ("pi is 3.14", "3.14"), ("+7", "+7"), ("none here", None), ("x2y", "2"),
])
def test_the_last_number_is_the_last_one_written(text, number):
    assert last_number(text) == number


def test_a_tag_wins_over_every_fallback_and_says_so():
    for fallback in ("last_number", "completion", "none"):
        got = extract_answer("12 then <answer>13</answer> then 14", fallback=fallback)
        assert (got.answer, got.tagged) == ("13", True)


def test_without_a_tag_the_fallback_reads_the_answer():
    text = "  the sum is 12 \n"
    assert extract_answer(text, fallback="last_number").answer == "12"
    assert extract_answer(text, fallback="completion").answer == "the sum is 12"
    assert extract_answer(text, fallback="none").answer is None
    assert not extract_answer(text).tagged


def test_the_numeric_answer_is_the_last_number_inside_the_tag_else_of_the_text():
    assert numeric_answer("3 <answer>x = 1,019</answer> 5") == 1019.0
    assert numeric_answer("3 + 2 = 5") == 5.0
    assert numeric_answer("<answer>none</answer> 5") is None
