"""Built-in downstream tasks from the biography world: well-formed examples, the unanswerable share,
span positions on the answer tokens, pair encoding, and SQuAD 2.0 scoring with the null threshold."""

import numpy as np
import pytest

from clue_jax.data import bios
from clue_jax.data.glue_squad import PairExample, SpanExample, encode_pair_examples, encode_span_examples
from clue_jax.data.tokenizer import train_bpe_tokenizer
from clue_jax.errors import UserInputError
from clue_jax.mcl import bios_tasks as T, downstream as D

WORLD = bios.build_world(bios.WorldConfig(num_background=30, num_new=40, zipf_exponent=0.0))
CFG = T.BiosTaskConfig(qa_per_person=2, pair_per_person=2, unanswerable_rate=0.25, drop_max=1, seed=3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [bios.rich_bio(p, np.random.default_rng(i)) for i, p in enumerate(WORLD.people)]
    return train_bpe_tokenizer(texts, 600, tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("style", ["paper", "rich"])
def test_qa_examples_well_formed_and_unanswerable_share(style):
    cfg = T.BiosTaskConfig(qa_per_person=2, unanswerable_rate=0.25, drop_max=1, seed=3, style=style)
    people = WORLD.new[:30]
    exs = T.bios_qa_examples(people, cfg, "train")
    assert len(exs) == 60
    impossible = [ex for ex in exs if ex.is_impossible]
    assert len(impossible) == round(0.25 * 60)
    by_name = {p.name: p for p in people}
    for ex in exs:
        (name,) = [n for n in by_name if n in ex.question]
        person = by_name[name]
        assert ex.context.startswith(name)  # the first sentence names the person
        attr = next(a for a in bios.ATTRIBUTES if bios.qa_items(person)[bios.ATTRIBUTES.index(a)].question
                    .split("\n")[0] == ex.question)
        spans = bios.attribute_spans(ex.context, person)
        if ex.is_impossible:
            assert attr not in spans and ex.answer_starts == ()  # the asked value is nowhere in the context
        else:
            (start,) = ex.answer_starts
            assert ex.answers == (person.attribute(attr),)
            assert ex.context[start:start + len(ex.answers[0])] == ex.answers[0] and spans[attr][0] == start
    # deterministic in (seed, split); another split draws differently
    assert T.bios_qa_examples(people, cfg, "train") == exs
    assert T.bios_qa_examples(people, cfg, "dev") != exs
    if style == "paper":  # the paper's fixed sentence order: birth date first when present
        full = [ex for ex in exs if "born on" in ex.context]
        assert full and all(" was born on " in ex.context.split(".")[0] for ex in full)


def test_pair_examples_half_agree_and_labels_are_true():
    people = WORLD.new[:20]
    exs = T.bios_pair_examples(people, CFG, "dev", value_pool=WORLD.people)
    assert len(exs) == 40 and sum(ex.label for ex in exs) == 20
    by_name = {p.name: p for p in people}
    for ex in exs:
        person = next(p for n, p in by_name.items() if ex.text_b.startswith(n))
        assert ex.text_a.startswith(person.name)
        claimed = [a for a in bios.ATTRIBUTES if person.attribute(a) in ex.text_b]
        if ex.label == 1:
            assert claimed  # the claim carries one of the person's own values ...
            assert any(person.attribute(a) in ex.text_a for a in claimed)  # ... which the biography states
        else:  # a false claim never carries the true value of its attribute
            assert not any(f" {person.attribute(a)}." in ex.text_b for a in bios.ATTRIBUTES
                           if a in bios.attribute_spans(ex.text_b, person))


def test_span_positions_point_at_the_answer_tokens(tokenizer):
    task = D.make_task("qa", {"train": T.bios_qa_examples(WORLD.new[:20], CFG, "train")}, tokenizer, 160,
                       on_overflow="error")
    a, offsets = task.arrays["train"], task.offsets["train"]
    for i, ex in enumerate(task.examples["train"]):
        s, e = int(a["start_positions"][i]), int(a["end_positions"][i])
        if ex.is_impossible:
            assert s == e == 0  # [CLS]
            continue
        assert 0 < s <= e and a["context_mask"][i, s] == a["context_mask"][i, e] == 1
        assert tokenizer.decode(a["input_ids"][i, s:e + 1]).strip() == ex.answers[0]
        assert D._span_text(ex, offsets[i], s, e) == ex.answers[0]
        n = int(a["attention_mask"][i].sum())
        assert a["input_ids"][i, 0] == tokenizer.bos_token_id and a["input_ids"][i, n - 1] == tokenizer.eos_token_id
        assert a["token_type_ids"][i, s] == 1 and a["token_type_ids"][i, 1] == 0


def test_truncated_answers_become_no_answer(tokenizer):
    context = "one two three four five six seven eight nine ten answerword"
    ex = SpanExample("x", "Where?", context, ("answerword",), (context.index("answerword"),))
    arrays, offsets = encode_span_examples(tokenizer, [ex], 12)
    assert arrays["truncated"][0] == 1 and arrays["start_positions"][0] == 0
    with pytest.raises(UserInputError, match="example 'x' has"):
        encode_span_examples(tokenizer, [ex], 12, on_overflow="error")
    arrays, _ = encode_span_examples(tokenizer, [ex], 64)
    assert arrays["truncated"][0] == 0
    wrong = SpanExample("y", "Where?", context, ("answerword",), (3,))  # text not at its start: ignored
    assert encode_span_examples(tokenizer, [wrong], 64)[0]["start_positions"][0] == 0
    assert tokenizer.decode(arrays["input_ids"][0, arrays["start_positions"][0]:arrays["end_positions"][0] + 1]
                            ).strip() == "answerword"


def test_pair_encoding_types_and_longest_first_truncation(tokenizer):
    pair = PairExample("p", "alpha beta gamma delta epsilon zeta eta theta", "short one", 1)
    single = PairExample("s", "alpha beta", None, 0)
    full = encode_pair_examples(tokenizer, [pair, single], 64)
    n = full["attention_mask"].sum(1)
    types = full["token_type_ids"]
    assert types[0, :n[0]].tolist().count(1) == len(tokenizer("short one", add_special_tokens=False)["input_ids"]) + 1
    assert types[1].sum() == 0 and full["labels"].tolist() == [1, 0]
    n_b = types[0].sum()  # the claim and its [SEP]
    cut = encode_pair_examples(tokenizer, [pair], 20)
    assert cut["attention_mask"].sum() == 20  # cut from the longer first segment, the claim kept whole
    assert cut["token_type_ids"][0].sum() == n_b
    cut = encode_pair_examples(tokenizer, [pair], 10)  # longest first: both end up (nearly) equal
    assert cut["attention_mask"].sum() == 10 and abs(int(cut["token_type_ids"][0].sum()) - 5) <= 1
    reg = encode_pair_examples(tokenizer, [PairExample("r", "a", "b", 3.5)], 8, regression=True)
    assert reg["labels"].dtype == np.float32 and reg["labels"][0] == 3.5


def test_null_threshold_is_chosen_for_f1():
    # Example 0 unanswerable (span wrong), example 1 answerable (span right), example 2 answerable (span wrong).
    diffs = np.array([2.0, -1.0, 0.5])  # null - best
    span_em = np.array([0.0, 1.0, 0.0])
    span_f1 = np.array([0.0, 1.0, 0.5])
    impossible = np.array([True, False, False])
    t = D.best_null_threshold(diffs, span_em, span_f1, impossible)
    # abstain on example 0 only: F1 (1 + 1 + 0.5) / 3 is the best possible
    assert 0.5 <= t < 2.0
    assert D.best_null_threshold(np.array([1.0]), np.zeros(1), np.zeros(1), np.array([True])) < 1.0


def test_task_config_errors():
    with pytest.raises(UserInputError, match="style 'fancy'"):
        T.BiosTaskConfig(style="fancy")
    with pytest.raises(UserInputError, match="unknown biography style"):
        T.bio_style({"colour": 1})
    assert T.bio_style({"name": "rich", "fullname_prob": 0.0}) == dict(num_templates=5, shuffle=True, fullname_prob=0.0)
    with pytest.raises(UserInputError, match="unanswerable_rate"):
        T.BiosTaskConfig(unanswerable_rate=1.5)
    with pytest.raises(UserInputError, match="has no examples"):
        D.make_task("empty", {"train": []}, None, 16)


def test_doc_stride_windows_recover_every_answer_span(tokenizer):
    """Long contexts split into overlapping windows: every answer lies whole in some window, and that window's
    target positions read back exactly the answer text; no context token is skipped."""
    people = WORLD.new[:20]
    exs = []
    for i, p in enumerate(people):  # three biographies in a row: far longer than one window
        own = bios.rich_bio(p, np.random.default_rng(i))
        prefix = " ".join(bios.rich_bio(q, np.random.default_rng(i)) for q in (people[i - 1], people[i - 2])) + " "
        context = prefix + own  # the asked person's biography last
        for attr in bios.ATTRIBUTES[::2]:
            start = len(prefix) + bios.attribute_spans(own, p)[attr][0]
            exs.append(SpanExample(f"x{i}-{attr}", f"What is the {attr} of {p.name}?", context,
                                   (p.attribute(attr),), (start,)))
    exs.append(SpanExample("none", "Where?", exs[0].context))  # unanswerable
    max_len, stride = 64, 20
    arrays, offsets = encode_span_examples(tokenizer, exs, max_len, doc_stride=stride)
    idx = arrays["example_index"]
    assert len(idx) > 3 * len(exs) and set(idx.tolist()) == set(range(len(exs)))
    for e, ex in enumerate(exs):
        rows = np.flatnonzero(idx == e)
        n_ctx = len(tokenizer(ex.context, add_special_tokens=False)["input_ids"])
        covered = {(int(a), int(b)) for r in rows for a, b in offsets[r][arrays["context_mask"][r] > 0]}
        assert len(covered) == n_ctx  # the windows cover the whole context
        hits = [r for r in rows if arrays["start_positions"][r] > 0]
        if ex.is_impossible:
            assert not hits and not arrays["truncated"][rows].any()
            continue
        assert hits, ex.id
        for r in hits:
            assert D._span_text(ex, offsets[r], arrays["start_positions"][r], arrays["end_positions"][r]) == ex.answers[0]
            assert arrays["token_type_ids"][r, arrays["start_positions"][r]] == 1
        assert all(arrays["truncated"][r] == (r not in hits) for r in rows)
    with pytest.raises(UserInputError, match="doc_stride=64 exceeds"):
        encode_span_examples(tokenizer, exs[:1], max_len, doc_stride=64)


def test_merge_windows_takes_the_best_span_and_lowest_null():
    pred = {"start": np.array([5, 7, 9, 4]), "end": np.array([6, 8, 9, 4]), "best": np.array([1.0, 3.0, 2.0, 0.5]),
            "null": np.array([2.0, 4.0, 1.5, 0.0])}
    out = D.merge_windows(pred, np.array([0, 0, 0, 1]), 2)
    assert out["window"].tolist() == [1, 3] and out["start"].tolist() == [7, 4] and out["end"].tolist() == [8, 4]
    assert out["best"].tolist() == [3.0, 0.5] and out["null"].tolist() == [1.5, 0.0]
    with pytest.raises(UserInputError, match="have no window"):
        D.merge_windows(pred, np.array([0, 0, 0, 0]), 2)


def test_pair_task_scored_with_its_glue_metric(tokenizer):
    exs = {"train": [PairExample("a", "alpha", None, 1), PairExample("b", "beta", None, 0)]}
    assert D.make_task("cola", exs, tokenizer, 16, metric="matthews").metric == "matthews"
    assert D.make_task("bios_pair", exs, tokenizer, 16).metric == "accuracy"
    assert D.task_score("pair", {"matthews": 0.25, "score": 0.25}) == 25.0
    with pytest.raises(UserInputError, match="metric 'bleu'"):
        D.make_task("x", exs, tokenizer, 16, metric="bleu")
