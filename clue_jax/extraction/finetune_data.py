"""Data for the frequency-shock experiment (docs/methods.md, "Frequency shock") on the biography world.

- People are split into disjoint groups: `pretrain_qa` (their QA pairs are in
  the pre-training corpus, so the base model knows the question format; 0 in
  the experiment, so that fine-tuning has a format to teach), `finetune`,
  `dev` and `test`. Everyone's
  biographies are in the pre-training corpus, so the facts asked about are in
  the weights; only the QA of the fine-tuning people is fine-tuned on.
- Pre-training frequency of an object entity = the number of pre-training
  documents stating it: every rich biography states all six attributes of
  its person, every QA document one (this mirrors
  `pipelines.foundations.pretraining_texts`).
- The fine-tuning set is skewed on purpose, independently of pre-training
  frequency: each relation's objects are split into pre-training-frequency
  strata and, within every stratum, a random share is left out of
  fine-tuning and another is over-sampled (`stratified_skew`). Frequencies
  are those of the entity string (cities count over birth_city and
  company_city), as the shock measurement sees them, and so is the skew: a
  city is labelled once, for both relations (`skew_groups`); ties are broken
  by the string.
- QA examples are `<bos> question answer <eos>` rows with a `loss_mask` on the
  answer and EOS only; question and answer are tokenised separately, exactly
  as a prompt is at test time.
"""
from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence

import numpy as np

from clue_jax.data import bios
from clue_jax.errors import UserInputError
from clue_jax.extraction import shock

RELATIONS = ("birth_city", "university", "major", "company", "company_city")
"""Relations asked about: every attribute but the birth date (dates are near-unique, not entities that recur)."""

GROUPS = ("pretrain_qa", "finetune", "dev", "test")


def check_relations(relations: Sequence[str], where: str = "relations") -> tuple[str, ...]:
    relations = tuple(relations)
    bad = [r for r in relations if r not in bios.ATTRIBUTES]
    if bad or not relations:
        raise UserInputError(f"{where}={list(relations)}: each must be one of {bios.ATTRIBUTES}")
    return relations


def split_people(people: Sequence[bios.Person], sizes: Mapping[str, int], seed: int) -> dict[str, list[bios.Person]]:
    """Disjoint groups of people (keys of `sizes`, in GROUPS order) from a seeded permutation."""
    unknown = sorted(set(sizes) - set(GROUPS))
    if unknown:
        raise UserInputError(f"unknown split(s) {unknown}; valid: {GROUPS}")
    counts = {g: int(sizes.get(g, 0)) for g in GROUPS}
    if any(n < 0 for n in counts.values()):
        raise UserInputError(f"split sizes must be >= 0, got {counts}")
    for g in ("finetune", "dev", "test"):
        if counts[g] == 0:
            raise UserInputError(f"splits.{g} must be > 0")
    total = sum(counts.values())
    if total > len(people):
        raise UserInputError(f"splits ask for {total} people but the world has {len(people)} (raise world.num_background)")
    order = np.random.default_rng([seed, 7]).permutation(len(people))
    out, start = {}, 0
    for g in GROUPS:
        out[g] = [people[i] for i in order[start:start + counts[g]]]
        start += counts[g]
    return out


def pretraining_objects(people: Sequence[bios.Person], qa_people: Sequence[bios.Person], bios_per_person: int,
                        relations: Sequence[str] = RELATIONS) -> list[str]:
    """The object of every fact occurrence in the pre-training corpus, one string per (document, relation).

    `people` all have `bios_per_person` rich biographies (each states every
    attribute); `qa_people` (a subset) also have one QA document per attribute.
    """
    objects = []
    for person in people:
        for rel in relations:
            objects.extend([person.attribute(rel)] * bios_per_person)
    for person in qa_people:
        objects.extend(person.attribute(rel) for rel in relations)
    return objects


def relation_objects(people: Sequence[bios.Person], relations: Sequence[str] = RELATIONS) -> dict[str, list[str]]:
    """Per relation, the distinct objects these people have (sorted): the closed candidate set of the world."""
    return {rel: sorted({p.attribute(rel) for p in people}) for rel in relations}


def rank_by_pretraining(objects: Sequence[str], freqs: Mapping[str, shock.EntityFreq]) -> list[str]:
    """Objects from most to least frequent in pre-training (ties by the entity string)."""
    zero = shock.EntityFreq(0, 0)
    keyed = sorted(set(objects), key=lambda o: (-freqs.get(shock.entity_key(o), zero).pretrain, shock.entity_key(o)))
    return keyed


def stratified_skew(ranked: Sequence[str], strata: int, left_out: float, oversampled: float,
                    rng: np.random.Generator) -> dict[str, tuple[int, str]]:
    """{object: (stratum, label)}: objects split into `strata` pre-training-frequency strata, labels drawn at random.

    `ranked` runs from most to least frequent in pre-training; stratum 0 holds
    the most frequent (np.array_split: sizes differ by at most one). Within
    each stratum left_out * size objects (rounded, halves up), drawn at random, are labelled
    "left_out", round(oversampled * size) others "oversampled", the rest
    "plain". Drawing within strata keeps the skew independent of pre-training
    frequency, so the shock statistic cannot mistake one for the other.
    """
    if strata < 1 or not (0.0 <= left_out and 0.0 <= oversampled and left_out + oversampled <= 1.0):
        raise UserInputError(f"skew settings out of range: strata={strata} (>= 1), left_out={left_out}, "
                             f"oversampled={oversampled} (each >= 0, sum <= 1)")
    out = {}
    for s, group in enumerate(np.array_split(np.asarray(list(ranked), dtype=object), min(strata, max(len(ranked), 1)))):
        order = rng.permutation(len(group))
        n_out = math.floor(left_out * len(group) + 0.5)  # halves round up
        n_over = min(math.floor(oversampled * len(group) + 0.5), len(group) - n_out)
        for rank, i in enumerate(order):
            label = "left_out" if rank < n_out else "oversampled" if rank < n_out + n_over else "plain"
            out[str(group[i])] = (s, label)
    return out


def skew_groups(candidates: Mapping[str, Sequence[str]], relations: Sequence[str]) -> list[list[str]]:
    """Relations joined when they share an object entity (birth_city and company_city share the cities).

    The skew labels each group's entities once, so an object left out of
    fine-tuning in one relation is not seen through another: the shock
    measurement counts an entity over every relation it answers.
    """
    order = list(relations)
    groups: list[tuple[set[str], list[str]]] = []  # (entity keys, relations)
    for rel in order:
        keys, members = {shock.entity_key(o) for o in candidates[rel]}, [rel]
        for group in [g for g in groups if g[0] & keys]:
            groups.remove(group)
            keys, members = keys | group[0], group[1] + members
        groups.append((keys, members))
    return sorted((sorted(members, key=order.index) for _, members in groups), key=lambda m: order.index(m[0]))


def skewed_finetune_items(people: Sequence[bios.Person], pretrain_freqs: Mapping[str, shock.EntityFreq],
                          candidates: Mapping[str, Sequence[str]], strata: int, left_out: float, oversampled: float,
                          repeat: int, seed: int, relations: Sequence[str] = RELATIONS) -> tuple[list[bios.QAItem], dict]:
    """The skewed fine-tuning QA items of `people`, and a description of the skew.

    `candidates[rel]` lists the relation's objects (e.g. `relation_objects` of
    everyone in pre-training); `pretrain_freqs` gives their pre-training
    frequency. Per `skew_groups` group, `stratified_skew` labels each entity
    once (its strata rank the group's entities): items whose answer is
    "left_out" are dropped, "oversampled" ones are repeated `repeat` times.
    Item order: by person, then relation, repeats adjacent (the batch source shuffles).
    """
    if repeat < 1:
        raise UserInputError(f"skew.repeat={repeat}: must be >= 1")
    rng = np.random.default_rng([seed, 41])
    by_entity: dict[str, tuple[int, str]] = {}
    for group in skew_groups(candidates, relations):
        keys = {shock.entity_key(o) for rel in group for o in candidates[rel]}
        by_entity.update(stratified_skew(rank_by_pretraining(keys, pretrain_freqs), strata, left_out, oversampled,
                                         rng))
    labels = {rel: {o: by_entity[shock.entity_key(o)] for o in candidates[rel]} for rel in relations}
    items = []
    stats = collections.Counter()
    for person in people:
        for item in bios.qa_items(person):
            if item.attribute not in relations:
                continue
            label = by_entity.get(shock.entity_key(item.answer), (0, "plain"))[1]
            if label == "left_out":
                stats["dropped"] += 1
                continue
            copies = repeat if label == "oversampled" else 1
            stats["rare_items" if copies > 1 else "plain_items"] += 1
            items.extend([item] * copies)
    info = {"dropped_objects": {r: sorted(o for o, (_, lab) in labels[r].items() if lab == "left_out") for r in relations},
            "rare_objects": {r: sorted(o for o, (_, lab) in labels[r].items() if lab == "oversampled") for r in relations},
            "stratum": {r: {o: s for o, (s, _) in labels[r].items()} for r in relations},
            "label": {r: {o: lab for o, (_, lab) in labels[r].items()} for r in relations},
            "strata": int(strata), "items": len(items), "dropped_items": stats["dropped"],
            "rare_items": stats["rare_items"], "plain_items": stats["plain_items"]}
    return items, info


def replay_people(people: Sequence[bios.Person], groups: Mapping[str, Sequence[bios.Person]],
                  held_out: Sequence[str] = ("dev", "test")) -> list[bios.Person]:
    """The people whose biographies mixture fine-tuning may replay: everyone but the `held_out` groups.

    Replaying a test person's biography during fine-tuning would rehearse the
    very facts the test asks for, which vanilla fine-tuning never sees.
    """
    excluded = {p.name for g in held_out for p in groups.get(g, ())}
    return [p for p in people if p.name not in excluded]


def qa_probe_items(people: Sequence[bios.Person], relations: Sequence[str] = RELATIONS) -> list[bios.QAItem]:
    """Every (person, relation) question, unskewed: the dev and test sets."""
    return [q for p in people for q in bios.qa_items(p) if q.attribute in relations]


def qa_examples(tokenizer, items: Sequence[bios.QAItem], seq_len: int) -> dict[str, np.ndarray]:
    """`<bos> question answer <eos>` rows (right-padded), loss_mask on the answer tokens and EOS.

    A row longer than seq_len is a UserInputError naming the item.
    """
    if not items:
        raise UserInputError("the fine-tuning set is empty (check splits.finetune and the skew settings)")
    questions = tokenizer([it.question for it in items], add_special_tokens=False)["input_ids"]
    answers = tokenizer([it.target for it in items], add_special_tokens=False)["input_ids"]
    n = len(items)
    ids = np.full((n, seq_len), tokenizer.pad_token_id, dtype=np.int32)
    mask = np.zeros((n, seq_len), dtype=np.int32)
    loss = np.zeros((n, seq_len), dtype=np.int32)
    for i, (q, a) in enumerate(zip(questions, answers)):
        row = [tokenizer.bos_token_id, *q, *a, tokenizer.eos_token_id]
        if len(row) > seq_len:
            raise UserInputError(f"fine-tuning example {i} ({items[i].question!r}) has {len(row)} tokens, "
                                 f"more than finetune.seq_len={seq_len}")
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
        loss[i, 1 + len(q):len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}
