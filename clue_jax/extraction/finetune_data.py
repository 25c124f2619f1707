"""Data for the frequency-shock experiment (METHODS.md section 2) on the biography world.

- People are split into disjoint groups: `pretrain_qa` (their QA pairs are in
  the pre-training corpus, so the base model knows the question format, as in
  Allen-Zhu & Li's mixed training), `finetune`, `dev` and `test`. Everyone's
  biographies are in the pre-training corpus, so the facts asked about are in
  the weights; only the QA of the fine-tuning people is fine-tuned on.
- Pre-training frequency of an object entity = the number of pre-training
  documents stating it: every rich biography states all six attributes of
  its person, every QA document one (this mirrors
  `pipelines.knowledge.pretraining_texts`).
- The fine-tuning set is skewed on purpose: items whose answer is among the
  `drop_top` objects of its relation most frequent in pre-training are left
  out, and items whose answer is among the rarest `rare_fraction` of the
  relation's objects are repeated `rare_repeat` times. Frequencies are those
  of the entity string (cities count over birth_city and company_city), as
  the shock measurement sees them; ties are broken by the string.
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


def skewed_finetune_items(people: Sequence[bios.Person], pretrain_freqs: Mapping[str, shock.EntityFreq],
                          candidates: Mapping[str, Sequence[str]], drop_top: int, rare_fraction: float,
                          rare_repeat: int, relations: Sequence[str] = RELATIONS) -> tuple[list[bios.QAItem], dict]:
    """The skewed fine-tuning QA items of `people`, and a description of the skew.

    `candidates[rel]` lists the relation's objects (e.g. `relation_objects` of
    everyone in pre-training); `pretrain_freqs` gives their pre-training
    frequency. Per relation, the `drop_top` most frequent objects are dropped
    and the rarest ceil(rare_fraction * #objects) are repeated `rare_repeat`
    times. Item order: by person, then relation, repeats adjacent (the batch
    source shuffles).
    """
    if drop_top < 0 or rare_repeat < 1 or not 0.0 <= rare_fraction <= 1.0:
        raise UserInputError(
            f"finetune skew settings out of range: drop_top={drop_top} (>= 0), rare_repeat={rare_repeat} (>= 1), "
            f"rare_fraction={rare_fraction} (in [0, 1])"
        )
    dropped, rare = {}, {}
    for rel in relations:
        ranked = rank_by_pretraining(candidates[rel], pretrain_freqs)
        dropped[rel] = ranked[:drop_top]
        n_rare = min(math.ceil(rare_fraction * len(ranked)), max(len(ranked) - drop_top, 0))
        rare[rel] = ranked[len(ranked) - n_rare:] if n_rare else []
    items = []
    stats = collections.Counter()
    for person in people:
        for item in bios.qa_items(person):
            if item.attribute not in relations:
                continue
            if item.answer in dropped[item.attribute]:
                stats["dropped"] += 1
                continue
            copies = rare_repeat if item.answer in rare[item.attribute] else 1
            stats["rare_items" if copies > 1 else "plain_items"] += 1
            items.extend([item] * copies)
    info = {"dropped_objects": dropped, "rare_objects": rare, "items": len(items),
            "dropped_items": stats["dropped"], "rare_items": stats["rare_items"], "plain_items": stats["plain_items"]}
    return items, info


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
