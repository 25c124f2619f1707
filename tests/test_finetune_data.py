"""Frequency-shock data: pre-training counts on a hand-made world, the skew as configured, disjoint splits,
answer-only loss masks."""
import collections
import re

import numpy as np
import pytest

from clue_jax.data import bios
from clue_jax.errors import UserInputError
from clue_jax.extraction import finetune_data as fd
from clue_jax.extraction import shock
from clue_jax.pipelines import foundations


def person(name, birth_city, university, major, company, company_city, gender="female"):
    return bios.Person(name=name, gender=gender, birth_date="May 2, 1971", birth_city=birth_city,
                       university=university, major=major, company=company, company_city=company_city)


# Oakmouth is a birth city twice and a company city once: one entity over two relations.
PEOPLE = [
    person("Ann Lee", "Oakmouth", "Tamley University", "Botany", "Jadecore Labs", "Fernwick"),
    person("Bo Chan", "Oakmouth", "Tamley University", "Geology", "Onyxlink Systems", "Mossgate", "male"),
    person("Cy Diaz", "Fernwick", "Quillmore College", "Botany", "Jadecore Labs", "Oakmouth", "male"),
]


def test_pretraining_frequencies_on_a_hand_made_world():
    # 2 bios per person, and Ann's QA documents: one per relation.
    objects = fd.pretraining_objects(PEOPLE, PEOPLE[:1], bios_per_person=2)
    freqs = shock.entity_frequencies(objects, ["Geology", "Mossgate", "Mossgate"])
    expected_pt = {
        "oakmouth": 2 * 3 + 1,  # Ann's and Bo's birth city, Cy's company city (2 bios each) + Ann's QA
        "fernwick": 2 * 2 + 1,  # Ann's company city, Cy's birth city + Ann's QA on her company city
        "mossgate": 2,
        "tamley university": 2 * 2 + 1,
        "quillmore college": 2,
        "botany": 2 * 2 + 1,
        "geology": 2,
        "jadecore labs": 2 * 2 + 1,
        "onyxlink systems": 2,
    }
    assert {e: f.pretrain for e, f in freqs.items()} == expected_pt
    assert freqs["mossgate"].finetune == 2 and freqs["geology"].finetune == 1 and freqs["botany"].finetune == 0
    # Only the relations asked for are counted.
    assert fd.pretraining_objects(PEOPLE, PEOPLE, 1, relations=("major",)) == ["Botany", "Geology", "Botany"] * 2


def test_counts_equal_documents_stating_the_object_in_the_real_corpus():
    """The counts match the documents `pretraining_texts` actually writes (whole-word search)."""
    texts = (foundations.pretraining_texts(PEOPLE[:1], 3, seed=0, with_qa=True)
             + foundations.pretraining_texts(PEOPLE[1:], 3, seed=1, with_qa=False))
    # Leave out Ann's birth-date QA (not a relation) before counting documents.
    texts = [t for t in texts if "birth date" not in t]
    objects = fd.pretraining_objects(PEOPLE, PEOPLE[:1], 3)
    counted = collections.Counter(objects)
    for value in counted:
        docs = sum(1 for t in texts for _ in re.finditer(rf"(?<!\w){re.escape(value)}(?!\w)", t))
        assert docs == counted[value], value


def test_skew_is_drawn_at_random_within_pretraining_strata():
    rng = np.random.default_rng(0)
    world = bios.build_world(bios.WorldConfig(seed=1, num_background=300, num_new=0, zipf_exponent=1.0,
                                              num_cities=20, num_universities=20, num_companies=20, num_majors=10))
    people = list(world.people)
    objects = fd.pretraining_objects(people, [], 2)
    freqs = shock.entity_frequencies(objects, [])
    candidates = fd.relation_objects(people)
    ft_people = [people[i] for i in rng.choice(len(people), 80, replace=False)]
    items, info = fd.skewed_finetune_items(ft_people, freqs, candidates, strata=3, left_out=0.25, oversampled=0.25,
                                           repeat=3, seed=5)
    for rel in fd.RELATIONS:
        ranked = fd.rank_by_pretraining(candidates[rel], freqs)
        pt = [freqs[shock.entity_key(o)].pretrain for o in ranked]
        assert pt == sorted(pt, reverse=True)
        # Strata are contiguous runs of the ranking (0 = most frequent), sizes within one of each other.
        strata = [info["stratum"][rel][o] for o in ranked]
        assert strata == sorted(strata) and set(strata) == {0, 1, 2}
        sizes = collections.Counter(strata)
        assert max(sizes.values()) - min(sizes.values()) <= 1
        # Every stratum has its share of left-out and over-sampled objects.
        for st, size in sizes.items():
            labels = collections.Counter(info["label"][rel][o] for o in ranked if info["stratum"][rel][o] == st)
            share = int(0.25 * size + 0.5)
            assert labels["left_out"] == share and labels["oversampled"] == share
        assert info["dropped_objects"][rel] == sorted(o for o in ranked if info["label"][rel][o] == "left_out")
    # Not the old rule (the most frequent left out, the rarest repeated): the draw is random within each stratum.
    draws = [fd.stratified_skew([f"o{i}" for i in range(12)], 3, 0.25, 0.25, np.random.default_rng(k)) for k in range(20)]
    firsts = collections.Counter(next(o for o, (_, lab) in d.items() if lab == "left_out") for d in draws)
    assert len(firsts) >= 3
    assert fd.stratified_skew(["a", "b"], 3, 0.5, 0.5, np.random.default_rng(0)) == {"a": (0, "left_out"),
                                                                                     "b": (1, "left_out")}
    again, _ = fd.skewed_finetune_items(ft_people, freqs, candidates, 3, 0.25, 0.25, 3, seed=5)
    assert again == items  # seeded
    counts = collections.Counter((it.name, it.attribute) for it in items)
    n_dropped = n_rare = 0
    for p in ft_people:
        for rel in fd.RELATIONS:
            label = info["label"][rel][p.attribute(rel)]
            assert counts[(p.name, rel)] == {"left_out": 0, "oversampled": 3, "plain": 1}[label]
            n_dropped += label == "left_out"
            n_rare += label == "oversampled"
    assert n_dropped == info["dropped_items"] > 0 and n_rare == info["rare_items"] > 0
    assert info["items"] == len(items) == 80 * len(fd.RELATIONS) - n_dropped + 2 * n_rare
    assert all(it.attribute != "birth_date" for it in items)
    with pytest.raises(UserInputError, match="skew"):
        fd.skewed_finetune_items(ft_people, freqs, candidates, 3, 0.7, 0.5, 3, seed=0)
    with pytest.raises(UserInputError, match="skew.repeat"):
        fd.skewed_finetune_items(ft_people, freqs, candidates, 3, 0.2, 0.2, 0, seed=0)


def test_a_city_is_skewed_once_for_both_of_its_relations():
    """Cities answer birth_city and company_city: a city left out is left out of both, so fine-tuning never shows it
    (the shock measurement counts an entity over every relation)."""
    world = bios.build_world(bios.WorldConfig(seed=2, num_background=200, num_new=0, zipf_exponent=1.0,
                                              num_cities=12, num_universities=8, num_companies=8, num_majors=6))
    people = list(world.people)
    freqs = shock.entity_frequencies(fd.pretraining_objects(people, [], 1), [])
    candidates = fd.relation_objects(people)
    candidates["major"] = candidates["major"] + ["Oakmouth"]  # a major named like a city joins the cities' group
    groups = fd.skew_groups(candidates, fd.RELATIONS)
    assert groups == [["birth_city", "major", "company_city"], ["university"], ["company"]]
    for seed in range(4):
        items, info = fd.skewed_finetune_items(people[:120], freqs, candidates, 3, 0.3, 0.3, 2, seed=seed)
        city_label = {}
        for rel in ("birth_city", "company_city"):
            for city, label in info["label"][rel].items():
                assert city_label.setdefault(city, label) == label, (seed, city)
        left_out = set(info["dropped_objects"]["birth_city"]) | set(info["dropped_objects"]["company_city"])
        assert left_out and not left_out & {it.answer for it in items}
        assert set(info["dropped_objects"]["birth_city"]) == left_out & set(candidates["birth_city"])


def test_replay_corpus_leaves_out_dev_and_test_people():
    from clue_jax.pipelines import extraction

    world = bios.build_world(bios.WorldConfig(seed=2, num_background=40, num_new=0))
    people = list(world.people)
    groups = fd.split_people(people, {"pretrain_qa": 0, "finetune": 10, "dev": 5, "test": 8}, seed=0)
    replay = fd.replay_people(people, groups)
    assert len(replay) == 40 - 5 - 8
    held = {p.name for g in ("dev", "test") for p in groups[g]}
    assert not held & {p.name for p in replay}
    texts = extraction.pretraining_corpus(replay, [], 2, seed=0)
    assert texts and not any(name in t for t in texts for name in held)
    assert any(p.name in t for t in texts for p in groups["finetune"])


def test_splits_are_disjoint_deterministic_and_sized():
    world = bios.build_world(bios.WorldConfig(seed=0, num_background=40, num_new=0))
    sizes = {"pretrain_qa": 5, "finetune": 12, "dev": 6, "test": 10}
    groups = fd.split_people(world.people, sizes, seed=3)
    assert {g: len(v) for g, v in groups.items()} == sizes
    names = [p.name for g in groups.values() for p in g]
    assert len(names) == len(set(names)) == 33
    assert fd.split_people(world.people, sizes, seed=3) == groups
    assert fd.split_people(world.people, sizes, seed=4) != groups
    assert fd.split_people(world.people, {**sizes, "pretrain_qa": 0}, seed=3)["pretrain_qa"] == []
    with pytest.raises(UserInputError, match="41 people"):
        fd.split_people(world.people, {**sizes, "test": 18}, seed=3)
    with pytest.raises(UserInputError, match="splits.dev"):
        fd.split_people(world.people, {**sizes, "dev": 0}, seed=3)
    with pytest.raises(UserInputError, match="unknown split"):
        fd.split_people(world.people, {**sizes, "train": 1}, seed=3)


class _CharTokenizer:
    """One token per character (ids 10+), BOS 0, EOS 1, PAD 2."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[10 + ord(c) for c in t] for t in texts]}


def test_qa_examples_mask_only_the_answer_and_eos():
    tok = _CharTokenizer()
    items = [bios.qa_items(p)[2] for p in PEOPLE[:2]]  # university questions
    data = fd.qa_examples(tok, items, seq_len=80)
    for row, item in enumerate(items):
        ids, mask, loss = (data[k][row] for k in ("input_ids", "attention_mask", "loss_mask"))
        n = int(mask.sum())
        assert ids[0] == tok.bos_token_id and ids[n - 1] == tok.eos_token_id and (ids[n:] == tok.pad_token_id).all()
        target = ids[loss == 1]
        assert "".join(chr(t - 10) for t in target[:-1]) == " " + item.answer and target[-1] == tok.eos_token_id
        assert loss[:1 + len(item.question)].sum() == 0
    with pytest.raises(UserInputError, match="finetune.seq_len=20"):
        fd.qa_examples(tok, items, seq_len=20)
    with pytest.raises(UserInputError, match="empty"):
        fd.qa_examples(tok, [], seq_len=20)
