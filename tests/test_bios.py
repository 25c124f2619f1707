"""The synthetic biography world: determinism, uniqueness, templates, QA, spans, Zipf skew."""

import dataclasses
import re

import numpy as np
import pytest

from clue_jax.data import bios

SMALL = bios.WorldConfig(seed=3, num_background=300, num_new=60)


@pytest.fixture(scope="module")
def small_world():
    return bios.build_world(SMALL)


def _rank_slope(world, attr):
    """Negative log-log slope of count vs popularity rank (rank from the vocab order)."""
    index = {v: i for i, v in enumerate(world.vocab[attr])}
    counts = np.bincount([index[p.attribute(attr)] for p in world.people],
                         minlength=len(index))
    ranks = np.arange(1, len(counts) + 1)
    seen = counts > 0
    return -np.polyfit(np.log(ranks[seen]), np.log(counts[seen]), 1)[0]


def test_same_seed_same_records_other_seed_differs(small_world):
    again = bios.build_world(SMALL)
    for split in ("background", "new"):
        assert bios.world_records(small_world, split) == bios.world_records(again, split)
    other = bios.build_world(dataclasses.replace(SMALL, seed=4))
    assert bios.world_records(other, "new") != bios.world_records(small_world, "new")


def test_sizes_unique_names_and_value_constraints(small_world):
    assert len(small_world.background) == 300 and len(small_world.new) == 60
    names = [p.name for p in small_world.people]
    assert len(set(names)) == len(names)
    assert all(len(n.split()) == 2 for n in names)
    assert {p.gender for p in small_world.people} == {"male", "female"}
    for attr in ("birth_city", "university", "major", "company", "company_city"):
        assert all(p.attribute(attr) in small_world.vocab[attr] for p in small_world.people)
    assert all(p.company_city != p.birth_city for p in small_world.people)
    assert all(re.fullmatch(r"[A-Z][a-z]+ \d{1,2}, (19[5-9]\d|2000)", p.birth_date)
               for p in small_world.people)


def test_vocab_sizes_distinct_and_substring_free():
    world = bios.build_world(bios.WorldConfig(num_background=1, num_new=0))
    sizes = {"birth_city": 200, "university": 200, "company": 200, "major": 100}
    for attr, size in sizes.items():
        assert len(world.vocab[attr]) == size == len(set(world.vocab[attr]))
    assert sorted(world.vocab["company_city"]) == sorted(world.vocab["birth_city"])
    values = [v for a in sizes for v in world.vocab[a]]
    for v in values:  # no value occurs as a whole word sequence inside another
        pattern = re.compile(rf"(?<!\w){re.escape(v)}(?!\w)")
        assert [u for u in values if pattern.search(u)] == [v]


def test_too_large_vocab_is_refused():
    with pytest.raises(ValueError, match="majors"):
        bios.build_world(bios.WorldConfig(num_majors=10_000))


def test_paper_bio_is_the_exact_template(small_world):
    p = next(p for p in small_world.people if p.gender == "female")
    assert bios.paper_bio(p) == (
        f"{p.name} was born on {p.birth_date}. She spent her early years in {p.birth_city}. "
        f"She received mentorship and guidance from faculty members at {p.university}. "
        f"She completed her education with a focus on {p.major}. "
        f"She had a professional role at {p.company}.")
    m = next(p for p in small_world.people if p.gender == "male")
    assert " He spent his early years in " in bios.paper_bio(m)


def test_rich_bio_paraphrases_order_and_names(small_world):
    people = small_world.people[:200]
    texts = [bios.rich_bio(p, np.random.default_rng(i)) for i, p in enumerate(people)]
    for p, text in zip(people, texts):
        assert text.startswith(p.name)
        assert set(bios.attribute_spans(text, p)) == set(bios.ATTRIBUTES)
    # Sentence order varies: the attribute mentioned first is not always the same.
    firsts = {min(bios.attribute_spans(t, p).items(), key=lambda kv: kv[1])[0]
              for p, t in zip(people, texts)}
    assert len(firsts) >= 4
    # Each attribute is written in at least 5 different ways across the sample.
    for attr in bios.ATTRIBUTES:
        forms = set()
        for p, text in zip(people, texts):
            start, end = bios.attribute_spans(text, p)[attr]
            dot = text.rfind(". ", 0, start)
            sentence_start = 0 if dot < 0 else dot + 2
            forms.add(text[sentence_start:start].replace(p.name, "X").split(" ", 1)[-1])
        assert len(forms) >= 5, (attr, forms)
    # Later sentences use both pronouns and the full name.
    assert any(" He " in t or " She " in t for t in texts)
    assert any(t.count(p.name) > 1 for p, t in zip(people, texts))
    with pytest.raises(ValueError):
        bios.rich_bio(people[0], np.random.default_rng(0), num_templates=99)


def test_qa_and_cloze_items(small_world):
    p = small_world.new[0]
    qa = bios.qa_items(p)
    assert [q.attribute for q in qa] == list(bios.ATTRIBUTES)
    assert qa[0].question == f"What is the birth date of {p.name}?\nAnswer:"
    assert qa[0].answer == p.birth_date and qa[0].target == " " + p.birth_date
    assert qa[-1].question == f"Which city is the company of {p.name} located in?\nAnswer:"
    assert all(q.question.endswith("\nAnswer:") and q.name == p.name for q in qa)
    cloze = bios.cloze_items(p)
    company = cloze[bios.ATTRIBUTES.index("company")]
    assert company.question == f"{p.name} had a professional role at"
    assert company.answer == p.company
    # Cloze prompts of the paper attributes are prefixes of the paper bio's sentences.
    bio = bios.paper_bio(p)
    for item in cloze:
        if item.attribute in bios.PAPER_ATTRIBUTES:
            sentence = item.question.replace(p.name, p.subject_pronoun.capitalize())
            assert (item.question + item.target) in bio or (sentence + item.target) in bio


def test_attribute_spans_locate_values(small_world):
    for record in bios.world_records(small_world, "new"):
        person = bios.person_from_record(record)
        paper = bios.attribute_spans(record["bio"], person)
        assert set(paper) == set(bios.PAPER_ATTRIBUTES)
        for attr, (start, end) in paper.items():
            assert record["bio"][start:end] == person.attribute(attr)
        # In the paper template values come in template order, further from the name.
        starts = [paper[a][0] for a in bios.PAPER_ATTRIBUTES]
        assert starts == sorted(starts)
        rich = bios.attribute_spans(record["bio_rich"], person)
        assert set(rich) == set(bios.ATTRIBUTES)
    p = small_world.new[0]
    with pytest.raises(ValueError, match="occurs 2 times"):
        bios.attribute_spans(f"{p.company} and {p.company}", p)


def test_records_fields(small_world):
    records = bios.world_records(small_world, "background")
    assert len(records) == 300
    r = records[5]
    assert set(r) == {"name", "gender", *bios.ATTRIBUTES, "bio", "bio_rich", "split"}
    assert r["split"] == "background" and r["bio"] == bios.paper_bio(small_world.background[5])
    assert all(isinstance(v, str) for v in r.values())
    with pytest.raises(ValueError):
        bios.world_records(small_world, "train")


@pytest.mark.parametrize("exponent", [0.0, 1.0, 1.5])
def test_value_popularity_follows_zipf(exponent):
    world = bios.build_world(bios.WorldConfig(seed=11, num_background=20_000, num_new=0,
                                              zipf_exponent=exponent))
    for attr in ("birth_city", "company", "major"):
        assert abs(_rank_slope(world, attr) - exponent) < 0.15, attr
