"""The rule rewards of reward_models.rules on hand-written cases."""

from __future__ import annotations

import pytest

from reward_models.rules import ContainsAnswer, ExactMatch, FormatReward, LengthReward, normalize_answer

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]


def prompts(n):
    return [PROMPT] * n


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Red.", "red"),
        ("red", "red"),
        ("Two", "2"),
        ("2", "2"),
        ("a circle", "circle"),
        ("An apple", "apple"),
        ("  Blue\n\t sky!! ", "blue sky"),
        ("twenty", "20"),
        ("zero", "0"),
        ("twenty-one", "20 1"),
        ("1,000", "1000"),
        ("2.5.", "2.5"),
        ("don't", "dont"),
        ("snake_case", "snake case"),
        ("THE", ""),
        ("Ｒｅｄ", "red"),  # full-width letters (NFKC)
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_normalises():
    completions = ["The Red.", "2", "a circle", "It is red", "blue", "Three"]
    answers = ["red", "two", "circle", "red", None, "3"]
    assert ExactMatch()(prompts(6), completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, None, 1.0]


def test_exact_match_multiple_answers_and_numbers():
    reward = ExactMatch()
    completions = ["Box", "square", "cube", "4", "x"]
    answers = [["square", "box"], ("square", None), ["box"], 4, []]
    assert reward(prompts(5), completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, None]


def test_exact_match_conversational_completions():
    completions = [
        [{"role": "assistant", "content": "Red."}],
        [{"role": "assistant", "content": [{"type": "text", "text": "gre"}, {"type": "text", "text": "en"}]}],
        [{"role": "assistant", "content": "blue"}],
    ]
    assert ExactMatch()(prompts(3), completions, answer=["red", "green", "red"]) == [1.0, 1.0, 0.0]


def test_answer_column_missing_or_renamed():
    with pytest.raises(ValueError, match="'answer'"):
        ExactMatch()(prompts(1), ["red"], label=["red"])
    with pytest.raises(ValueError, match="'label'"):
        ContainsAnswer(answer_column="label")(prompts(1), ["red"], answer=["red"])
    assert ExactMatch(answer_column="label")(prompts(1), ["red"], label=["red"]) == [1.0]
    with pytest.raises(ValueError, match="2 entries for 1 completions"):
        ExactMatch()(prompts(1), ["red"], answer=["red", "blue"])


def test_contains_answer():
    completions = [
        "There are two squares.",
        "It is reddish",
        "It is red.",
        "The answer is dark blue!",
        "blue, dark",
        "anything",
        "The",
        "red green blue",
    ]
    answers = ["2", "red", "red", "dark blue", "dark blue", None, "the", "green"]
    expected = [1.0, 0.0, 1.0, 1.0, 0.0, None, 1.0, 1.0]
    assert ContainsAnswer()(prompts(len(completions)), completions, answer=answers) == expected


def test_format_reward():
    reward = FormatReward()
    completions = ["red", "Red.", "red square", "  red \n", "", "red!"]
    assert reward(prompts(6), completions) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    digits = FormatReward(r"^\d+$")
    assert digits(prompts(3), ["12", "12a", " 7 "]) == [1.0, 0.0, 1.0]
    assert FormatReward(r"(?i)yes|no")(prompts(2), ["YES", "maybe"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="invalid regular expression"):
        FormatReward("(unclosed")


def test_length_reward_documented_example():
    reward = LengthReward(max_length=3)
    completions = ["red", "it is red", "it is bright red", "one two three four five", "a b c d e f", "a " * 10, ""]
    assert reward(prompts(7), completions) == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3, 0.0, 0.0, 0.0])


def test_length_reward_bounds_and_units():
    assert LengthReward()(prompts(3), ["", "x", "a " * 500]) == [0.0, 1.0, 1.0]  # default: non-empty
    below = LengthReward(min_length=4, max_length=6)
    assert below(prompts(3), ["a", "a b", "a b c d e"]) == [0.25, 0.5, 1.0]
    chars = LengthReward(min_length=2, max_length=4, tolerance=2, unit="chars")
    assert chars(prompts(4), [" ab ", "a", "abcde", "abcdefgh"]) == [1.0, 0.5, 0.5, 0.0]
    for bad in (dict(unit="tokens"), dict(min_length=-1), dict(min_length=5, max_length=2), dict(tolerance=0)):
        with pytest.raises(ValueError, match="length"):
            LengthReward(**bad)


def test_names():
    assert [r.name for r in (ExactMatch(), ContainsAnswer(), FormatReward(), LengthReward())] == [
        "exact_match",
        "contains_answer",
        "format",
        "length",
    ]
    assert ExactMatch().__name__ == "exact_match"  # what TRL reads
