"""What the knowledge pipelines learn and are asked: documents and probes, of the built-in world or a user corpus.

Shared by the knowledge and replication pipelines (the documents a student learns, the QA and cloze probes, the
k-shot pool), with the descriptions of that data their summaries carry.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from clue_jax.data import bios, lm_data
from clue_jax.errors import UserInputError
from clue_jax.eval import corpus_probes, qa_eval, value_nll
from clue_jax.pipelines import validate
from clue_jax.pipelines.foundations import load_people


@dataclasses.dataclass
class Knowledge:
    """The documents to learn and the probes that test them (one split of people)."""

    docs: list[str]
    probes: list[qa_eval.Probe]
    cloze: list[qa_eval.Probe]
    people: list | None  # bios.Person per doc for the built-in world, else None
    where: list[str] | None = None  # "file:line" per doc of a user corpus, for error messages
    answers: list[tuple[corpus_probes.AnswerSite, str]] | None = None  # user corpus: (where, attribute) per answer


def people_knowledge(people, fillers_before_far: int = 0) -> Knowledge:
    """The paper's template per person (pronoun-style world: with `fillers_before_far` fillers)."""
    keep = bios.PAPER_ATTRIBUTES  # company_city is not in the paper's template, so it cannot be learned
    return Knowledge(
        docs=[bios.study_bio(p, fillers_before_far) for p in people],
        probes=[qa_eval.Probe(q.question, q.answer, q.attribute, q.name)
                for p in people for q in bios.qa_items(p) if q.attribute in keep],
        cloze=[qa_eval.Probe(q.question, q.answer, q.attribute, q.name)
               for p in people for q in bios.cloze_items(p) if q.attribute in keep],
        people=list(people),
    )


def user_knowledge(config) -> Knowledge:
    """The user's documents and questions, read and checked whole (errors name file, line and config key)."""
    rows, qa = validate.user_files(config)
    docs = [doc for _, doc in rows]
    probes = [qa_eval.Probe(r["question"], r["answer"], r.get("attribute", "all"), r.get("name", "")) for r in qa]
    found = [(site, p) for p in probes if (site := corpus_probes.answer_site(docs, p.question, p.answer))]
    cloze = [qa_eval.Probe(site.cloze, p.answer, p.attribute, p.name) for site, p in found if site.cloze]
    return Knowledge(docs, probes, cloze, None, [f"{config.data.corpus}:{n}" for n, _ in rows],
                     answers=[(site, p.attribute) for site, p in found])


def knowledge_splits(config, world_dir) -> dict[str, Knowledge]:
    """'test' (and 'dev' for hyper-parameter choice): the new people, or the user's corpus + QA file."""
    if config.data.source == "corpus":
        return {"test": user_knowledge(config)}
    people = load_people(world_dir, "new")
    n_dev = int(config.data.get("num_dev", 0))
    if n_dev >= len(people):
        raise UserInputError(f"data.num_dev={n_dev} leaves no test people out of world.num_new={len(people)}")
    fillers = config.world.get("fillers_before_far", 0)
    splits = {"test": people_knowledge(people[n_dev:], fillers)}
    if n_dev:
        splits["dev"] = people_knowledge(people[:n_dev], fillers)
    return splits


def shot_pool(world_dir):
    pool: dict[str, list[tuple[str, str]]] = {}
    for person in load_people(world_dir, "background"):
        for item in bios.qa_items(person):
            pool.setdefault(item.attribute, []).append((item.question, item.answer))
    return pool


def documents_data(tokenizer, knowledge: Knowledge, seq_len: int) -> dict[str, np.ndarray]:
    """One document per row; a document longer than cpt.seq_len names its file and line and the longest one."""
    lengths = [len(ids) + 2 for ids in tokenizer(knowledge.docs, add_special_tokens=False)["input_ids"]]  # bos, eos
    too_long = [i for i, n in enumerate(lengths) if n > seq_len]
    if too_long:
        name = lambda i: knowledge.where[i] if knowledge.where else f"new person {i + 1}'s biography"
        first, longest = too_long[0], int(np.argmax(lengths))
        raise UserInputError(
            f"{name(first)}: document has {lengths[first]} tokens (with <bos> and <eos>), more than "
            f"cpt.seq_len={seq_len}; {len(too_long)} of {len(lengths)} documents are too long, the longest "
            f"({name(longest)}) has {lengths[longest]}: raise --config.cpt.seq_len to at least {lengths[longest]}")
    return lm_data.one_per_row(tokenizer, knowledge.docs, seq_len)


def name_distances(ctx, split: str = "test") -> dict[str, float]:
    knowledge = ctx.knowledge[split]
    if knowledge.people is None:
        return {}
    rows = [(text, len(p.name), bios.attribute_spans(text, p)) for text, p in zip(knowledge.docs, knowledge.people)]
    return qa_eval.token_distances(ctx.tokenizer, rows)


def token_lengths(ctx, split: str = "test") -> dict[str, float]:
    """Mean length in tokens of the name and of each attribute value, as written inside the biographies."""
    knowledge = ctx.knowledge[split]
    if knowledge.people is None:
        return {}
    lengths: dict[str, list[int]] = {}
    for text, person in zip(knowledge.docs, knowledge.people):
        spans = {"name": (0, len(person.name)), **bios.attribute_spans(text, person)}
        for attr, span in spans.items():
            lengths.setdefault(attr, []).append(len(value_nll.value_positions(ctx.tokenizer, text, span)))
    return {a: float(np.mean(v)) for a, v in lengths.items()}


def data_description(ctx) -> dict:
    """What the tables are about: the new people of the built-in world, or the user's files; and the shots.

    A user corpus is asked zero-shot: its QA file has no separate examples to show, and the built-in
    world's questions would teach another format.
    """
    config = ctx.config
    test = ctx.knowledge["test"]
    k = config.eval.k_shot if ctx.shots else 0
    if config.data.source == "corpus":
        corpus_name, qa_name = os.path.basename(config.data.corpus), os.path.basename(config.data.qa_file)
        return {"source": "corpus", "k_shot": k, "documents": len(test.docs), "questions": len(test.probes),
                "title": f"your documents ({corpus_name}, {len(test.docs)} documents)",
                "qa": f"{k}-shot: the {len(test.probes)} questions of {qa_name}, asked as written",
                "answers_found": len(test.answers or []),
                "cloze": f"the answer's own sentence up to the answer: {len(test.cloze)} of the {len(test.probes)} "
                         "answers, found in a document"}
    return {"source": "bios", "k_shot": k, "documents": len(test.docs), "questions": len(test.probes),
            "title": "new people", "qa": f"{k}-shot 'What is the company of {{name}}?'"}
