"""The pronoun-style world: the name in the first sentence only, identity-free fillers, distance by one number."""

import dataclasses
import re

import numpy as np
import pytest

from clue_jax.data import bios, bios_vocab

PRONOUN = bios.WorldConfig(seed=5, num_background=120, num_new=30, style="pronoun", fillers_before_far=3)


@pytest.fixture(scope="module")
def world():
    return bios.build_world(PRONOUN)


def _sentences(text):
    return re.split(r"(?<=\.) ", text)


def _mentions(text, person):
    """Whole-word occurrences of the full name or any part of it."""
    return [w for w in [person.name, *person.name.split()] if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text)]


def _identity_words(world):
    return {w for p in world.people for w in p.name.split()} | {
        v for a, vs in world.vocab.items() for v in vs} | {p.birth_date for p in world.people}


def test_same_people_as_the_repeated_name_world_and_pronouns_drawn(world):
    plain = bios.build_world(dataclasses.replace(PRONOUN, style="repeated_name", fillers_before_far=0))
    strip = lambda p: dataclasses.replace(p, pronoun="")
    assert [strip(p) for p in world.people] == list(plain.people)
    assert {p.pronoun for p in world.people} == {"he", "she", "they"}
    assert all(p.pronoun in ("they", {"male": "he", "female": "she"}[p.gender]) for p in world.people)
    assert all(p.pronoun == "" for p in plain.people)


def test_pretraining_bios_name_once_use_pronouns_and_identity_free_fillers(world):
    identity = _identity_words(world)
    filler_counts = set()
    for i, record in enumerate(bios.world_records(world, "background")):
        person = bios.person_from_record(record)
        assert person == world.background[i]
        text = record["bio_rich"]
        sentences = _sentences(text)
        assert _mentions(sentences[0], person) and not any(_mentions(s, person) for s in sentences[1:]), text
        fillers = [s for s in sentences if s in bios_vocab.FILLERS]
        assert 0 <= len(fillers) <= bios.MAX_FILLERS and sentences[0] not in bios_vocab.FILLERS
        filler_counts.add(len(fillers))
        assert len(sentences) == len(bios.ATTRIBUTES) + len(fillers)
        assert set(bios.attribute_spans(text, person)) == set(bios.ATTRIBUTES)
        pronoun = person.subject_pronoun.capitalize()
        assert sum(s.startswith((pronoun + " ", person.possessive_pronoun.capitalize() + " "))
                   for s in sentences[1:]) == len(bios.ATTRIBUTES) - 1  # every attribute sentence after the first
        assert not re.search(r"\bThey (was|celebrates|hails)\b", text)
    assert filler_counts == set(range(bios.MAX_FILLERS + 1))
    for filler in bios_vocab.FILLERS:  # no name part, no value, no pronoun
        assert not any(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", filler) for w in identity), filler
        assert not re.search(r"\b(he|she|they|his|her|their|him|them)\b", filler, re.IGNORECASE), filler


@pytest.mark.parametrize("fillers", [0, 2, 7])
def test_test_bio_puts_the_fillers_before_the_far_attributes(world, fillers):
    for person in world.new:
        text = bios.filled_paper_bio(person, fillers)
        sentences = _sentences(text)
        assert len(sentences) == len(bios.PAPER_ATTRIBUTES) + fillers
        assert [s in bios_vocab.FILLERS for s in sentences] == [False] * 2 + [True] * fillers + [False] * 3
        spans = bios.attribute_spans(text, person)
        last_filler_end = sum(len(s) + 1 for s in sentences[:2 + fillers])
        assert all(spans[a][0] >= last_filler_end for a in bios.FAR_ATTRIBUTES)
        assert spans["birth_city"][1] < last_filler_end - sum(len(s) + 1 for s in sentences[2:2 + fillers]) + 1
        assert _mentions(sentences[0], person) and not any(_mentions(s, person) for s in sentences[1:])
    with pytest.raises(ValueError, match="fillers_before_far"):
        bios.filled_paper_bio(world.new[0], len(bios_vocab.FILLERS) + 1)


def test_records_deterministic_by_seed_and_study_bios_have_the_configured_fillers(world):
    again = bios.build_world(PRONOUN)
    for split in ("background", "new"):
        assert bios.world_records(world, split) == bios.world_records(again, split)
    other = bios.build_world(dataclasses.replace(PRONOUN, seed=6))
    assert bios.world_records(other, "background") != bios.world_records(world, "background")
    for record, person in zip(bios.world_records(world, "new"), world.new):
        assert record["pronoun"] == person.pronoun
        assert sum(s in bios_vocab.FILLERS for s in _sentences(record["bio"])) == PRONOUN.fillers_before_far
        assert record["bio"] == bios.study_bio(person, 3)
    they = next(p for p in world.new if p.pronoun == "they")
    assert " They spent their early years in " in bios.paper_bio(they)
    assert bios.cloze_items(they)[1].question == f"{they.name} spent their early years in"
    with pytest.raises(ValueError, match="world style"):
        bios.build_world(dataclasses.replace(PRONOUN, style="pronouns"))


def test_pretraining_texts_follow_the_people_style(world):
    from clue_jax.pipelines import foundations
    texts = foundations.pretraining_texts(list(world.background[:10]), 2, seed=1, with_qa=False)
    again = foundations.pretraining_texts(list(world.background[:10]), 2, seed=1, with_qa=False)
    assert texts == again and len(texts) == 20
    for text in texts:
        person = next(p for p in world.background[:10] if text.startswith(p.name) or f"{p.name}'s" in text)
        sentences = _sentences(text)
        assert _mentions(sentences[0], person) and not any(_mentions(s, person) for s in sentences[1:])


def _quickstart():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py")
    spec = importlib.util.spec_from_file_location("cfg_quickstart_pronoun", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("tiny")


@pytest.mark.parametrize("changes, expected", [
    ({"world.style": "pronouns"}, "--config.world.style='pronouns': must be one of repeated_name, pronoun"),
    ({"world.style": "pronoun", "world.fillers_before_far": -1}, "fillers_before_far=-1: must be an integer >= 0"),
    ({"world.style": "pronoun", "world.fillers_before_far": 99}, "fillers_before_far=99: must be at most 24"),
    ({"world.fillers_before_far": 2}, "fillers_before_far=2 needs --config.world.style=pronoun"),
    ({"world.style": "pronoun", "world.fillers_before_far": 2, "data.source": "corpus", "data.corpus": "c.jsonl",
      "data.qa_file": "q.jsonl"}, "data.source='corpus' tests your documents"),
])
def test_world_keys_refused_in_one_line(changes, expected):
    from clue_jax.errors import UserInputError
    from clue_jax.pipelines.validate import check_config
    config = _quickstart()
    for key, value in changes.items():
        section, name = key.split(".")
        config[section][name] = value
    with pytest.raises(UserInputError) as err:
        check_config(config)
    assert expected in str(err.value) and "\n" not in str(err.value).strip()
    config = _quickstart()
    config.world.style, config.world.fillers_before_far = "pronoun", 4
    check_config(config)


def test_world_stage_inputs_unchanged_at_the_defaults():
    from clue_jax.pipelines import foundations
    config = _quickstart()
    before = {k: v for k, v in config.world.to_dict().items() if k not in ("style", "fillers_before_far")}
    assert foundations.world_inputs(config) == before
    config.world.style = "pronoun"
    assert foundations.world_inputs(config) == {**before, "style": "pronoun"}
