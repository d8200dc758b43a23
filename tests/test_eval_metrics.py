"""Evaluation metrics on hand-computed cases: normalisation, exact match, answer extraction, circular scoring, WER."""

from __future__ import annotations

import logging

import pytest

from omniola.evaluation import metrics
from omniola.evaluation.metrics import (
    circular_outcome,
    english_normalizer,
    exact_match,
    extract_choice,
    normalize_answer,
    rotate_options,
    word_error_rate,
)


@pytest.mark.parametrize("text, expected", [
    ("The  Twenty-one dogs!", "21 dogs"),
    ("Three.", "3"),
    ("an apple, a pear", "apple pear"),
    ("It's 3.5 or 1,000", "its 3.5 or 1000"),
    ("zero", "0"),
    ("ninety nine", "99"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("Three.", "3")
    assert exact_match("The circle", "circle")
    assert exact_match("LEFT!", ["right", "left"])
    assert not exact_match("a red circle", "red")
    assert not exact_match("33", "3")


OPTIONS = {"A": "cat", "B": "dog", "C": "red fox", "D": "fox"}


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("[C]", "C"),
    ("The answer is B", "B"), ("Answer: (D)", "D"), ("B. dog", "B"), ("The correct option is C.", "C"),
    ("I think C", "C"), ("A is correct", "A"),
    ("dog", "B"), ("It is a dog.", "B"), ("A dog", "B"),      # the article "A" is not option A
    ("red fox", "C"), ("a fox", "D"),                          # "fox" inside "red fox" does not count twice
    ("A or B", None), ("(A) and (B)", None), ("cat and dog", None),   # ambiguous
    ("", None), ("no idea", None), ("E", None),
])
def test_extract_choice(answer, expected):
    assert extract_choice(answer, OPTIONS) == expected


def test_rotate_options():
    texts = ["w", "x", "y", "z"]  # right answer: "x" (B)
    assert rotate_options(texts, 1, 0) == (["w", "x", "y", "z"], 1)
    assert rotate_options(texts, 1, 1) == (["x", "y", "z", "w"], 0)
    assert rotate_options(texts, 1, 3) == (["z", "w", "x", "y"], 2)
    for k in range(4):  # the right text is always at the returned index
        rotated, right = rotate_options(texts, 1, k)
        assert rotated[right] == "x"


@pytest.mark.parametrize("outcomes, expected", [
    (["correct"] * 4, "correct"),
    (["correct", "correct", "wrong", "correct"], "wrong"),
    (["correct", "unparsable"], "unparsable"),
    (["wrong", "unparsable"], "wrong"),
    (["correct", "failed"], "failed"),
    (["invalid"], "invalid"),
])
def test_circular_outcome(outcomes, expected):
    assert circular_outcome(outcomes) == expected


def test_wer_is_corpus_level_after_whisper_normalisation():
    normalizer = english_normalizer(warn=False)
    refs = ["Hello, world!", "The colour is red."]
    hyps = ["hello word", "the color is red and blue"]
    # "hello world" / "hello word": 1 substitution; "the color is red" (colour -> color by the spelling map) /
    # "the color is red and blue": 2 insertions. 3 errors over 2 + 4 reference words.
    out = word_error_rate(refs, hyps, normalizer)
    assert (out["substitutions"], out["deletions"], out["insertions"], out["reference_words"]) == (1, 0, 2, 6)
    assert out["wer"] == pytest.approx(3 / 6)
    # corpus WER, not the mean of utterance WERs (which would be (0 + 1) / 2)
    out = word_error_rate(["a b c d", "e"], ["a b c d", "x"])
    assert out["wer"] == pytest.approx(1 / 5)
    # numbers are standardised: "twenty five" == "25"
    assert word_error_rate(["twenty five apples"], ["25 apples"], normalizer)["wer"] == 0.0
    # an empty reference: its words are insertions
    out = word_error_rate(["a b", ""], ["a b", "c d"])
    assert (out["insertions"], out["reference_words"], out["wer"]) == (2, 2, 1.0)
    assert word_error_rate([""], [""])["wer"] is None


def test_normalizer_without_spelling_map_warns_and_still_normalises(monkeypatch, caplog):
    monkeypatch.setattr(metrics, "_spelling_map", lambda model_dir: None)
    with caplog.at_level(logging.WARNING, logger="omniola.evaluation.metrics"):
        normalizer = english_normalizer()
    assert "spelling map" in caplog.text
    assert normalizer("Twenty-five colours!") == "25 colours"
    out = word_error_rate(["The colour is red."], ["the color is red"], normalizer)
    assert out["wer"] == pytest.approx(1 / 4)  # colour / color now differ


def test_spelling_map_from_a_model_directory(tmp_path):
    (tmp_path / "normalizer.json").write_text('{"grey": "gray"}')
    assert english_normalizer(tmp_path)("Grey") == "gray"
