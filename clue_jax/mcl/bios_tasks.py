"""The MCL downstream tasks built from the biography world, so the pipeline needs no download.

Built in, from the biography world (`clue_jax.data.bios`), so the pipeline
needs no download:
- `bios_qa`: SQuAD 2.0-style extractive QA over one biography, written in a
  `BIO_STYLES` style: "paper" (default; the paper's single template per
  attribute, fixed order, the name once), "single_template" (the same with
  the name repeated now and then) or "rich" (bioS: paraphrases, shuffled
  sentences, the name now and then); the question asks for one
  attribute ("What is the company of Ann Lee?"). An unanswerable question
  asks for an attribute whose sentence is left out of the context, so the
  context still holds values of the same type (the company city when the
  birth city is asked): SQuAD 2.0's "plausible but absent" answers. Exactly
  round(unanswerable_rate * N) questions of each split are unanswerable.
- `bios_pair`: sentence-pair classification, "does this sentence agree with
  this biography?": (biography, one claim about the same person, in one of
  the style's paraphrases), label 1 = the claim's value is the person's, 0 = it is
  another person's value of the same attribute. Exactly half agree.
`drop_max` leaves up to that many other attributes out of each context, for
varied lengths and positions.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from clue_jax.data import bios
from clue_jax.data.glue_squad import PairExample, SpanExample
from clue_jax.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class BiosTaskConfig:
    qa_per_person: int = 2
    pair_per_person: int = 2
    unanswerable_rate: float = 1 / 3  # SQuAD 2.0 has about a third unanswerable
    drop_max: int = 1  # up to this many other attributes left out of a context
    style: dict = dataclasses.field(default_factory=dict)  # bios_context keywords (see BIO_STYLES)
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.unanswerable_rate <= 1.0:
            raise UserInputError(f"downstream.unanswerable_rate={self.unanswerable_rate} must be in [0, 1]")
        if self.qa_per_person < 0 or self.pair_per_person < 0:
            raise UserInputError("downstream.qa_per_person and pair_per_person must be >= 0")
        if not 0 <= self.drop_max <= len(bios.ATTRIBUTES) - 1:
            raise UserInputError(f"downstream.drop_max={self.drop_max} must be in [0, {len(bios.ATTRIBUTES) - 1}]")
        object.__setattr__(self, "style", bio_style(self.style))


def _fill(template: str, person: bios.Person, value: str, use_name: bool) -> str:
    subject = person.name if use_name else person.subject_pronoun.capitalize()
    poss = f"{person.name}'s" if use_name else person.possessive_pronoun.capitalize()
    return template.format(S=subject, P=poss, p=person.possessive_pronoun, v=value)


BIO_STYLES = {
    # the paper's biography: one fixed template per attribute, fixed order, the name once then pronouns
    "paper": dict(num_templates=1, shuffle=False, fullname_prob=0.0),
    # the paper's templates and order, the full name repeated in about half the sentences (so a replaced
    # name token is detectable in pre-training: the cross-mention consistency the pair task needs)
    "single_template": dict(num_templates=1, shuffle=False, fullname_prob=0.5),
    # bioS "rich": one of five paraphrases per attribute, sentences shuffled, the name now and then
    "rich": dict(num_templates=5, shuffle=True, fullname_prob=0.5),
}


def bio_style(style) -> dict:
    """A style name from BIO_STYLES or a dict of bios_context keywords -> the keywords, checked."""
    if isinstance(style, str):
        if style not in BIO_STYLES:
            raise UserInputError(f"biography style {style!r} is not one of {sorted(BIO_STYLES)}")
        style = BIO_STYLES[style]
    values = dict(style or {})
    if "name" in values:
        values = {**BIO_STYLES[values.pop("name")], **values}
    unknown = sorted(set(values) - {"num_templates", "shuffle", "fullname_prob"})
    if unknown:
        raise UserInputError(f"unknown biography style key(s) {unknown}; valid: num_templates, shuffle, fullname_prob")
    values = {**BIO_STYLES["paper"], **values}
    if not 1 <= int(values["num_templates"]) <= min(len(t) for t in bios.RICH_TEMPLATES.values()):
        raise UserInputError(f"biography style num_templates={values['num_templates']} is out of range")
    if not 0.0 <= float(values["fullname_prob"]) <= 1.0:
        raise UserInputError(f"biography style fullname_prob={values['fullname_prob']} must be in [0, 1]")
    return {"num_templates": int(values["num_templates"]), "shuffle": bool(values["shuffle"]),
            "fullname_prob": float(values["fullname_prob"])}


def bios_context(person: bios.Person, attributes: Sequence[str], rng: np.random.Generator,
                 num_templates: int = 1, shuffle: bool = False, fullname_prob: float = 0.0) -> str:
    """A biography stating only `attributes` (in ATTRIBUTES order unless `shuffle`).

    Sentence templates are drawn from the first `num_templates` paraphrases;
    the first sentence names the person, later ones with `fullname_prob`
    (else a pronoun). The default is the paper's single-template form.
    """
    order = [attributes[i] for i in rng.permutation(len(attributes))] if shuffle else list(attributes)
    sentences = []
    for pos, attr in enumerate(order):
        template = bios.RICH_TEMPLATES[attr][rng.integers(num_templates)]
        sentences.append(_fill(template, person, person.attribute(attr), pos == 0 or rng.random() < fullname_prob))
    return " ".join(sentences)


def _question(person: bios.Person, attribute: str) -> str:
    item = next(q for q in bios.qa_items(person) if q.attribute == attribute)
    return item.question.split("\n")[0]


def _exact_share(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean [n] with exactly round(rate * n) True, at random places."""
    flags = np.zeros(n, bool)
    flags[rng.permutation(n)[:int(round(rate * n))]] = True
    return flags


def bios_qa_examples(people: Sequence[bios.Person], cfg: BiosTaskConfig, split: str = "train") -> list[SpanExample]:
    """SQuAD 2.0-style QA over biographies (see the module docstring); deterministic in (cfg.seed, split)."""
    rng = np.random.default_rng([cfg.seed, 101, sum(map(ord, split))])
    plan = [(p, rng.choice(bios.ATTRIBUTES)) for p in people for _ in range(cfg.qa_per_person)]
    impossible = _exact_share(len(plan), cfg.unanswerable_rate, rng)
    out = []
    for i, ((person, attr), no_answer) in enumerate(zip(plan, impossible)):
        others = [a for a in bios.ATTRIBUTES if a != attr]
        dropped = set(rng.permutation(others)[:rng.integers(cfg.drop_max + 1)]) if cfg.drop_max else set()
        keep = [a for a in bios.ATTRIBUTES if a not in dropped and not (no_answer and a == attr)]
        context = bios_context(person, keep, rng, **cfg.style)
        if no_answer:
            answers, starts = (), ()
        else:
            start = bios.attribute_spans(context, person)[attr][0]
            answers, starts = (person.attribute(attr),), (start,)
        out.append(SpanExample(id=f"bios_qa-{split}-{i}", question=_question(person, attr), context=context,
                               answers=answers, answer_starts=starts))
    return out


def bios_pair_examples(people: Sequence[bios.Person], cfg: BiosTaskConfig, split: str = "train",
                       value_pool: Sequence[bios.Person] | None = None) -> list[PairExample]:
    """(biography, claim) pairs, label 1 = the claim agrees with the biography; exactly half agree.

    A false claim takes another person's value of the same attribute (from
    `value_pool`, default `people`), never the true one.
    """
    rng = np.random.default_rng([cfg.seed, 202, sum(map(ord, split))])
    pool = list(value_pool or people)
    values = {a: sorted({p.attribute(a) for p in pool}) for a in bios.ATTRIBUTES}
    plan = [(p, rng.choice(bios.ATTRIBUTES)) for p in people for _ in range(cfg.pair_per_person)]
    agree = _exact_share(len(plan), 0.5, rng)
    out = []
    for i, ((person, attr), true_claim) in enumerate(zip(plan, agree)):
        others = [a for a in bios.ATTRIBUTES if a != attr]
        dropped = set(rng.permutation(others)[:rng.integers(cfg.drop_max + 1)]) if cfg.drop_max else set()
        context = bios_context(person, [a for a in bios.ATTRIBUTES if a not in dropped], rng, **cfg.style)
        value = person.attribute(attr)
        if not true_claim:
            wrong = [v for v in values[attr] if v != value]
            if not wrong:
                raise UserInputError(f"bios_pair: no other value of {attr!r} to make a false claim")
            value = wrong[rng.integers(len(wrong))]
        templates = bios.RICH_TEMPLATES[attr][:cfg.style["num_templates"]]  # the contexts' paraphrases
        claim = _fill(templates[rng.integers(len(templates))], person, value, use_name=True)
        out.append(PairExample(id=f"bios_pair-{split}-{i}", text_a=context, text_b=claim, label=int(true_claim)))
    return out


def builtin_tasks(people_by_split: dict[str, Sequence[bios.Person]], cfg: BiosTaskConfig) -> dict[str, dict]:
    """{"bios_qa": {split: [SpanExample]}, "bios_pair": {split: [PairExample]}} for the given people splits."""
    pool = [p for ps in people_by_split.values() for p in ps]
    return {
        "bios_qa": {s: bios_qa_examples(ps, cfg, s) for s, ps in people_by_split.items()},
        "bios_pair": {s: bios_pair_examples(ps, cfg, s, pool) for s, ps in people_by_split.items()},
    }
