"""SQuAD exact match / F1 on known strings, and per-group averaging."""

import math

import numpy as np
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


# ----------------------------------------------------------------------------- GLUE metrics, detection AUC


def test_binary_metrics_known_values():
    # tp 2, fp 1, fn 1, tn 1: accuracy 3/5, F1 = 4 / 6, MCC = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    pred, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert metrics.accuracy(pred, gold) == pytest.approx(0.6)
    assert metrics.binary_f1(pred, gold) == pytest.approx(2 / 3)
    assert metrics.matthews_corrcoef(pred, gold) == pytest.approx(1 / 6)
    assert metrics.matthews_corrcoef(gold, gold) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef([1 - g for g in gold], gold) == pytest.approx(-1.0)
    assert metrics.matthews_corrcoef([1] * 5, gold) == 0.0  # undefined (a constant predictor): 0, as sklearn


def test_multiclass_matthews_is_the_correlation_of_one_hot_codes():
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    pred[:120] = gold[:120]
    x, y = np.eye(3)[pred], np.eye(3)[gold]
    x, y = x - x.mean(0), y - y.mean(0)
    reference = (x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum())
    assert metrics.matthews_corrcoef(pred, gold) == pytest.approx(reference)


def test_correlations_known_values():
    # x = [1, 2, 3], y = [1, 2, 4]: sum dx*dy = 3, sum dx^2 = 2, sum dy^2 = 42/9
    assert metrics.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 42 / 9))
    assert metrics.spearman([1, 2, 3], [1, 2, 4]) == pytest.approx(1.0)
    # ties: ranks [1, 2.5, 2.5, 4] against [1, 3, 2, 4]
    assert metrics.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(
        metrics.pearson([1, 2.5, 2.5, 4], [1, 3, 2, 4]))
    from scipy import stats

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert metrics.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0])
    assert metrics.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0])


def test_glue_metrics_per_task_kind():
    pred, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert metrics.glue_metrics("matthews", pred, gold) == {"matthews": pytest.approx(1 / 6),
                                                            "score": pytest.approx(1 / 6)}
    f1 = metrics.glue_metrics("f1", pred, gold)
    assert f1["f1"] == pytest.approx(2 / 3) and f1["accuracy"] == pytest.approx(0.6)
    assert f1["score"] == pytest.approx((2 / 3 + 0.6) / 2)
    sts = metrics.glue_metrics("pearson", [1, 2, 3], [1, 2, 4])
    assert set(sts) == {"pearson", "spearman", "score"} and sts["spearman"] == pytest.approx(1.0)
    with pytest.raises(UserInputError, match="GLUE metric 'bleu'"):
        metrics.glue_metrics("bleu", pred, gold)
    with pytest.raises(UserInputError, match="5 predictions for 4 labels"):
        metrics.accuracy(pred, gold[:4])


def test_detection_auc():
    labels = np.array([[0, 1, 0, 1], [1, 0, 0, 0]])
    assert metrics.detection_auc(labels * 3.0 - 1.0, labels) == 1.0  # perfect
    assert metrics.detection_auc(np.full(labels.shape, 0.7), labels) == 0.5  # constant
    assert metrics.detection_auc(-labels, labels) == 0.0
    # 2 positives (0.35, 0.8) against 2 negatives (0.1, 0.4): 3 of 4 pairs ordered right
    assert metrics.detection_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # the mask drops a negative that outscores every positive
    assert metrics.detection_auc([9.0, 0.1, 0.8, 0.9], [0, 0, 1, 1], mask=[0, 1, 1, 1]) == 1.0
    assert math.isnan(metrics.detection_auc([0.2, 0.3], [0, 0]))


def test_library_metrics_give_the_numbers_of_the_former_hand_written_ones():
    """scikit-learn / scipy.stats against the values the project's own formulas gave on the same seeded inputs
    (K-class MCC, positive-class F1 with 3 label values, correlations with ties, masked AUC with tied scores)."""
    rng = np.random.default_rng(7)
    p3, y3 = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    pb, yb = rng.integers(0, 2, 25), rng.integers(0, 2, 25)
    xs = rng.normal(size=30)
    ys = xs + rng.normal(size=30)
    ys[::5] = ys[0]  # ties
    scores = np.round(rng.normal(size=50), 1)
    labels = (scores + rng.normal(size=50) > 0).astype(int)
    mask = rng.integers(0, 2, 50)
    expected = [
        (metrics.accuracy(p3, y3), 0.3),
        (metrics.binary_f1(pb, yb), 0.5517241379310345),
        (metrics.binary_f1(p3, y3), 0.2222222222222222),
        (metrics.matthews_corrcoef(p3, y3), -0.043687094117476497),
        (metrics.matthews_corrcoef(pb, yb), -0.027461751819054487),
        (metrics.pearson(xs, ys), 0.5467692005266551),
        (metrics.spearman(xs, ys), 0.35220816195030685),
        (metrics.detection_auc(scores, labels, mask), 0.8848484848484849),
        (metrics.detection_auc(scores, labels), 0.8421474358974359),
    ]
    for got, want in expected:
        assert got == pytest.approx(want, abs=1e-12)
    assert math.isnan(metrics.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])) and math.isnan(metrics.spearman([1.0], [2.0]))
    assert metrics.binary_f1([0, 0], [0, 0]) == 0.0 and math.isnan(metrics.detection_auc([0.1, 0.2], [1, 1]))
