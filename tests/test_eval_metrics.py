"""SQuAD exact match / F1 on known strings, and per-group averaging."""

import math

import pytest

from clue_jax.errors import UserInputError
from clue_jax.eval import metrics


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  a   cat, AN apple; the end.  ", "cat apple end"),
        ("theory and Anthem", "theory and anthem"),  # articles only as whole words
        ("May 2, 1971", "may 2 1971"),
        ("", ""),
        ("The", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert metrics.normalize_answer(raw) == expected


def test_exact_match_known_strings():
    assert metrics.exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert metrics.exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert metrics.exact_match("Paris", ["London", "paris"]) == 1.0
    assert metrics.exact_match("", "") == 1.0
    assert metrics.exact_match("", "Paris") == 0.0


def test_token_f1_known_strings():
    # pred tokens {new, york, city}, gold {new, york}: p = 2/3, r = 1 -> f1 = 0.8
    assert metrics.token_f1("New York City", "new york") == pytest.approx(0.8)
    # duplicate tokens count with multiplicity: pred [a1, a1], gold [a1]: p = 1/2, r = 1
    assert metrics.token_f1("x x", "x") == pytest.approx(2 / 3)
    assert metrics.token_f1("Boston", "new york") == 0.0
    # best over several golds
    assert metrics.token_f1("new york", ["boston", "new york city"]) == pytest.approx(0.8)


def test_empty_edge_cases_follow_squad2():
    assert metrics.token_f1("", "") == 1.0  # no-answer question answered with no answer
    assert metrics.token_f1("the", "a") == 1.0  # both normalise to nothing
    assert metrics.token_f1("", "Paris") == 0.0
    assert metrics.token_f1("Paris", "") == 0.0


def test_empty_gold_list_is_refused():
    with pytest.raises(UserInputError, match="empty"):
        metrics.exact_match("x", [])


def test_aggregate_per_group():
    records = [
        {"prediction": "Paris", "answer": "paris", "attr": "city"},
        {"prediction": "Rome", "answer": "Milan", "attr": "city"},
        {"prediction": "new york city", "answer": "New York", "attr": "company"},
    ]
    out = metrics.aggregate(records, key_fn=lambda r: r["attr"])
    assert list(out) == ["city", "company"]
    assert out["city"] == {"exact_match": 0.5, "f1": 0.5, "count": 2}
    assert out["company"]["exact_match"] == 0.0
    assert out["company"]["f1"] == pytest.approx(0.8)
    overall = metrics.aggregate(records)
    assert overall["all"]["count"] == 3
    assert overall["all"]["f1"] == pytest.approx((1 + 0 + 0.8) / 3)
    assert math.isnan(metrics.empty_group()["exact_match"])


def test_aggregate_missing_field_names_record():
    with pytest.raises(UserInputError, match="record 1 has no 'answer'"):
        metrics.aggregate([{"prediction": "a", "answer": "a"}, {"prediction": "b"}])


def test_qa_prompt_layout_and_shot_choice():
    import numpy as np

    from clue_jax.eval import prompts

    shots = [("What is the birth city of Ann Lee?\nAnswer:", "Oslo"), ("What is the major of Bo Chan?\nAnswer:", "Law")]
    q = "What is the company of Cy Dee?\nAnswer:"
    assert prompts.qa_prompt(q, shots) == (
        "What is the birth city of Ann Lee?\nAnswer: Oslo\n\nWhat is the major of Bo Chan?\nAnswer: Law\n\n" + q
    )
    assert prompts.qa_prompt(q) == q
    with pytest.raises(UserInputError, match="newline"):
        prompts.qa_prompt(q, [("Q?\nAnswer:", "two\nlines")])
    pool = shots + [(q, "Acme")]
    picked = prompts.choose_shots(pool, 2, np.random.default_rng(0), exclude_question=q)
    assert sorted(picked) == sorted(shots)  # the asked question never appears among its shots
    with pytest.raises(UserInputError, match="only 2"):
        prompts.choose_shots(pool, 3, np.random.default_rng(0), exclude_question=q)
