"""A deterministic synthetic biography world in the style of bioS (Allen-Zhu & Li).

Why synthetic: the methods need people whose facts a model has never seen, with
known attribute positions and controllable value popularity. Everything here is
a pure function of `WorldConfig`, so the same seed gives byte-identical records
on every host and every run.

Choices made where the references are silent (all documented in code below):
- Attribute values (except birth dates) follow a Zipf popularity
  p(rank) ~ 1 / rank**zipf_exponent over each vocabulary; which value holds which
  rank is a seeded permutation. Birth dates are uniform over 1950-01-01 .. 2000-12-31.
- company_city uses the city vocabulary with its own popularity permutation and
  is never equal to the person's birth_city, so every value occurs exactly once
  in a biography and `attribute_spans` is unambiguous.
- Vocabularies and name pools are built so that no value, name part or template
  phrase contains another one as a whole-word substring.

Two world styles (`WorldConfig.style`): "repeated_name" (bioS's rich form: later
sentences repeat the full name about half the time) and "pronoun", where a
pre-training biography names its person in the first sentence only, refers to them
by a pronoun (he, she or they, drawn per person) after it, and mixes in 0-4 filler
sentences that carry no identity; its test biography is the paper's template with
`fillers_before_far` fillers before the far attributes. Only there does recalling
a far fact require carrying the name across distance.
"""

from __future__ import annotations

import dataclasses
import datetime
import re

import numpy as np

from clue_jax.data import bios_vocab

STYLES = ("repeated_name", "pronoun")  # clue_jax/choices.py WORLD_STYLES names the same
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "company", "company_city")
PAPER_ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "company")

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_DATE_START = datetime.date(1950, 1, 1).toordinal()
_DATE_END = datetime.date(2000, 12, 31).toordinal()


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    num_background: int = 400
    num_new: int = 100
    zipf_exponent: float = 1.0  # popularity of attribute values ~ 1/rank**s
    num_cities: int = 200
    num_universities: int = 200
    num_companies: int = 200
    num_majors: int = 100
    rich_templates_per_attribute: int = 5  # paraphrases drawn from in the rich form
    style: str = "repeated_name"  # or "pronoun": the name in the first sentence only (see the module doc)
    fillers_before_far: int = 0  # pronoun style: filler sentences before university, major, company in test bios


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    gender: str  # "male" | "female"
    birth_date: str
    birth_city: str
    university: str
    major: str
    company: str
    company_city: str
    pronoun: str = ""  # "he" | "she" | "they" in the pronoun-style world; "" = by gender

    def attribute(self, attr: str) -> str:
        if attr not in ATTRIBUTES:
            raise KeyError(f"unknown attribute {attr!r}; expected one of {ATTRIBUTES}")
        return getattr(self, attr)

    @property
    def _pronouns(self) -> tuple[str, str, str]:
        return _PRONOUNS[self.pronoun or ("he" if self.gender == "male" else "she")]

    @property
    def subject_pronoun(self) -> str:
        return self._pronouns[0]

    @property
    def possessive_pronoun(self) -> str:
        return self._pronouns[1]

    @property
    def object_pronoun(self) -> str:
        return self._pronouns[2]


_PRONOUNS = {"he": ("he", "his", "him"), "she": ("she", "her", "her"), "they": ("they", "their", "them")}
# The templates' present-tense and "was" verbs as "they" takes them (the others are past tense).
_PLURAL_VERBS = {"was": "were", "celebrates": "celebrate", "hails": "hail"}


@dataclasses.dataclass(frozen=True)
class World:
    config: WorldConfig
    background: tuple[Person, ...]
    new: tuple[Person, ...]
    # attribute -> values, most popular first; birth_date is omitted (uniform dates).
    vocab: dict[str, tuple[str, ...]]

    @property
    def people(self) -> tuple[Person, ...]:
        return self.background + self.new


@dataclasses.dataclass(frozen=True)
class QAItem:
    """One probe. `answer` is the bare value; the model's target continuation of
    `question` is `target` = " " + answer (prompts end without a trailing space)."""

    name: str
    attribute: str
    question: str
    answer: str

    @property
    def target(self) -> str:
        return " " + self.answer


# ---------------------------------------------------------------------------
# Templates. Placeholders: {S} subject (full name or He/She), {P} sentence-initial
# possessive (name's or His/Her), {p} mid-sentence possessive (his/her), {v} value.
# The first entry of each list is the paper's sentence.
# ---------------------------------------------------------------------------
RICH_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{S} was born on {v}.",
        "{S} came into this world on {v}.",
        "{P} birthday falls on {v}.",
        "{S} celebrates {p} birthday on {v}.",
        "{P} life began on {v}.",
        "{S} entered the world on {v}.",
    ),
    "birth_city": (
        "{S} spent {p} early years in {v}.",
        "{S} was born in {v}.",
        "{S} grew up in {v}.",
        "{P} hometown is {v}.",
        "{S} hails from {v}.",
        "{S} was raised in {v}.",
    ),
    "university": (
        "{S} received mentorship and guidance from faculty members at {v}.",
        "{S} studied at {v}.",
        "{S} graduated from {v}.",
        "{S} earned {p} degree at {v}.",
        "{S} attended {v} for {p} higher education.",
        "{P} alma mater is {v}.",
    ),
    "major": (
        "{S} completed {p} education with a focus on {v}.",
        "{S} majored in {v}.",
        "{P} field of study was {v}.",
        "{S} specialized in {v} during {p} studies.",
        "{S} pursued a degree in {v}.",
        "{S} devoted {p} studies to {v}.",
    ),
    "company": (
        "{S} had a professional role at {v}.",
        "{S} worked at {v}.",
        "{S} was employed by {v}.",
        "{P} employer was {v}.",
        "{S} built a career at {v}.",
        "{S} held a position at {v}.",
    ),
    "company_city": (
        "{S} worked in {v}.",
        "{P} workplace was located in {v}.",
        "{S} commuted to an office in {v}.",
        "{P} job was based in {v}.",
        "{S} pursued {p} career in {v}.",
        "{P} office was in {v}.",
    ),
}

_QUESTIONS = {
    "birth_date": "What is the birth date of {name}?\nAnswer:",
    "birth_city": "What is the birth city of {name}?\nAnswer:",
    "university": "What is the university of {name}?\nAnswer:",
    "major": "What is the major of {name}?\nAnswer:",
    "company": "What is the company of {name}?\nAnswer:",
    "company_city": "Which city is the company of {name} located in?\nAnswer:",
}

_CLOZES = {
    "birth_date": "{name} was born on",
    "birth_city": "{name} spent {p} early years in",
    "university": "{name} received mentorship and guidance from faculty members at",
    "major": "{name} completed {p} education with a focus on",
    "company": "{name} had a professional role at",
    "company_city": "{name} worked in",
}

def _template_phrases() -> list[str]:
    """Literal template text with placeholders cut out (registered before any value)."""
    pieces = []
    for text in list(_QUESTIONS.values()) + list(_CLOZES.values()) + [
            t for ts in RICH_TEMPLATES.values() for t in ts]:
        pieces += [p for p in re.split(r"\{\w+\}", text) if bios_vocab.words(p)]
    return pieces + ["He", "She", "His", "Her", *_MONTHS]  # (unchanged by "They": the pools stay the same)


def _zipf_probs(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return weights / weights.sum()


def _format_date(ordinal: int) -> str:
    d = datetime.date.fromordinal(int(ordinal))
    return f"{_MONTHS[d.month - 1]} {d.day}, {d.year}"


def build_world(config: WorldConfig) -> World:
    """Builds the world: same config -> identical people, in the same order."""
    if config.num_background < 0 or config.num_new < 0:
        raise ValueError("num_background and num_new must be >= 0")
    if config.style not in STYLES:
        raise ValueError(f"unknown world style {config.style!r}; expected one of {STYLES}")
    base, male, female, surnames = bios_vocab.pools(config.num_cities, config.num_universities,
                                                    config.num_companies, config.num_majors,
                                                    tuple(_template_phrases()))
    rng = np.random.default_rng(config.seed)
    n = config.num_background + config.num_new
    # Seeded popularity: rank order of each vocabulary (company_city gets its own order).
    vocab = {
        "birth_city": base["birth_city"],
        "university": base["university"],
        "major": base["major"],
        "company": base["company"],
        "company_city": base["birth_city"],
    }
    vocab = {k: tuple(v[i] for i in rng.permutation(len(v))) for k, v in vocab.items()}
    vocab = {k: vocab[k] for k in ATTRIBUTES if k in vocab}

    genders = np.where(rng.random(n) < 0.5, "male", "female")
    names = np.empty(n, dtype=object)
    for gender, firsts in (("male", male), ("female", female)):
        idx = np.flatnonzero(genders == gender)
        capacity = len(firsts) * len(surnames)
        if len(idx) > capacity:
            raise ValueError(f"at most {capacity} unique {gender} names; asked for {len(idx)}")
        pairs = rng.choice(capacity, size=len(idx), replace=False)
        names[idx] = [f"{firsts[p // len(surnames)]} {surnames[p % len(surnames)]}" for p in pairs]

    dates = rng.integers(_DATE_START, _DATE_END + 1, size=n)
    draws = {}
    for attr in ("birth_city", "university", "major", "company", "company_city"):
        size = len(vocab[attr])
        draws[attr] = rng.choice(size, size=n, p=_zipf_probs(size, config.zipf_exponent))
    # company_city != birth_city, so that each value appears once per biography.
    city_rank = {c: i for i, c in enumerate(vocab["company_city"])}
    birth_as_cc_rank = np.array([city_rank[vocab["birth_city"][i]] for i in draws["birth_city"]],
                                dtype=np.int64)
    clash = draws["company_city"] == birth_as_cc_rank
    cc_probs = _zipf_probs(len(vocab["company_city"]), config.zipf_exponent)
    while clash.any():
        draws["company_city"][clash] = rng.choice(len(cc_probs), size=int(clash.sum()), p=cc_probs)
        clash = draws["company_city"] == birth_as_cc_rank

    # Pronouns come from their own stream, so both styles hold the same people.
    pronouns = [""] * n if config.style == "repeated_name" else [
        "they" if u < 1 / 3 else ("he" if g == "male" else "she")
        for u, g in zip(np.random.default_rng([config.seed, 2]).random(n), genders)]
    people = tuple(
        Person(name=names[i], gender=str(genders[i]), birth_date=_format_date(dates[i]),
               **{a: vocab[a][draws[a][i]] for a in draws}, pronoun=pronouns[i])
        for i in range(n))
    return World(config=config, background=people[:config.num_background],
                 new=people[config.num_background:], vocab=vocab)


def _fill(template: str, person: Person, value: str, use_name: bool) -> str:
    if not use_name and person.subject_pronoun == "they":
        template = re.sub(r"\{S\} (\w+)", lambda m: "{S} " + _PLURAL_VERBS.get(m.group(1), m.group(1)), template)
    subject = person.name if use_name else person.subject_pronoun.capitalize()
    poss = f"{person.name}'s" if use_name else person.possessive_pronoun.capitalize()
    return template.format(S=subject, P=poss, p=person.possessive_pronoun, v=value)


def paper_bio(person: Person) -> str:
    """The paper's single five-sentence template (name once, then pronouns)."""
    return " ".join(_fill(RICH_TEMPLATES[a][0], person, person.attribute(a), use_name=(i == 0))
                    for i, a in enumerate(PAPER_ATTRIBUTES))


def _check_templates(num_templates: int) -> None:
    if not 1 <= num_templates <= min(len(t) for t in RICH_TEMPLATES.values()):
        raise ValueError(f"num_templates must be in [1, {len(RICH_TEMPLATES['major'])}]")


def rich_bio(person: Person, rng: np.random.Generator, *, num_templates: int = 5,
             permute: bool = True, fullname_prob: float = 0.5) -> str:
    """bioS-style rich form: one of `num_templates` paraphrases per attribute (all six),
    sentences in random order (if `permute`); the first sentence names the person, each
    later one uses the full name with probability `fullname_prob`, else a pronoun."""
    _check_templates(num_templates)
    order = rng.permutation(len(ATTRIBUTES)) if permute else np.arange(len(ATTRIBUTES))
    sentences = []
    for pos, k in enumerate(order):
        attr = ATTRIBUTES[k]
        template = RICH_TEMPLATES[attr][rng.integers(num_templates)]
        use_name = pos == 0 or rng.random() < fullname_prob
        sentences.append(_fill(template, person, person.attribute(attr), use_name))
    return " ".join(sentences)


MAX_FILLERS = 4  # filler sentences in a pronoun-style pre-training biography: 0..MAX_FILLERS
FAR_ATTRIBUTES = ("university", "major", "company")  # the paper template's last three sentences


def pronoun_bio(person: Person, rng: np.random.Generator, *, num_templates: int = 5) -> str:
    """Pronoun style's pre-training biography: all six attributes (one of `num_templates` paraphrases each)
    in random order, the person named in the first sentence only, then 0..MAX_FILLERS filler sentences
    placed at random after the first."""
    _check_templates(num_templates)
    sentences = [_fill(RICH_TEMPLATES[ATTRIBUTES[k]][rng.integers(num_templates)], person,
                       person.attribute(ATTRIBUTES[k]), use_name=pos == 0)
                 for pos, k in enumerate(rng.permutation(len(ATTRIBUTES)))]
    for f in rng.choice(len(bios_vocab.FILLERS), size=rng.integers(MAX_FILLERS + 1), replace=False):
        sentences.insert(int(rng.integers(1, len(sentences) + 1)), bios_vocab.FILLERS[f])
    return " ".join(sentences)


def filled_paper_bio(person: Person, fillers: int) -> str:
    """Pronoun style's test biography: the paper's template with `fillers` filler sentences (chosen by the
    person's name) before the far attributes, so their distance from the name is set by one number."""
    if not 0 <= fillers <= len(bios_vocab.FILLERS):
        raise ValueError(f"fillers_before_far must be in [0, {len(bios_vocab.FILLERS)}], got {fillers}")
    sentences = [_fill(RICH_TEMPLATES[a][0], person, person.attribute(a), use_name=(i == 0))
                 for i, a in enumerate(PAPER_ATTRIBUTES)]
    rng = np.random.default_rng(list(person.name.encode()))
    chosen = [bios_vocab.FILLERS[f] for f in rng.choice(len(bios_vocab.FILLERS), size=fillers, replace=False)]
    near = len(PAPER_ATTRIBUTES) - len(FAR_ATTRIBUTES)
    return " ".join(sentences[:near] + chosen + sentences[near:])


def study_bio(person: Person, fillers_before_far: int) -> str:
    """The document a student learns about a new person: the paper's template, or the pronoun style's."""
    return filled_paper_bio(person, fillers_before_far) if person.pronoun else paper_bio(person)


def pretraining_bio(person: Person, rng: np.random.Generator, *, num_templates: int = 5) -> str:
    """A base model's pre-training biography in the person's world style (pronoun people carry a pronoun)."""
    write = pronoun_bio if person.pronoun else rich_bio
    return write(person, rng, num_templates=num_templates)


def qa_items(person: Person) -> list[QAItem]:
    """One question per attribute, e.g. "What is the birth date of {name}?\\nAnswer:"."""
    return [QAItem(person.name, a, _QUESTIONS[a].format(name=person.name), person.attribute(a))
            for a in ATTRIBUTES]


def cloze_items(person: Person) -> list[QAItem]:
    """One sentence prefix per attribute, e.g. "{name} had a professional role at"."""
    return [QAItem(person.name, a,
                   _CLOZES[a].format(name=person.name, p=person.possessive_pronoun),
                   person.attribute(a)) for a in ATTRIBUTES]


def attribute_spans(text: str, person: Person) -> dict[str, tuple[int, int]]:
    """Character span [start, end) of each attribute value found in `text`.

    Attributes absent from the text are left out; a value found more than once
    raises ValueError (the world's vocabularies are built so this cannot happen in
    its own biographies).
    """
    spans = {}
    for attr in ATTRIBUTES:
        value = person.attribute(attr)
        hits = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(value)}(?!\w)", text)]
        if len(hits) > 1:
            raise ValueError(f"{attr} value {value!r} occurs {len(hits)} times in the text")
        if hits:
            spans[attr] = hits[0]
    return spans


_SPLITS = ("background", "new")


def world_records(world: World, split: str) -> list[dict[str, str]]:
    """Flat string records for one split; `bio_rich` is drawn from (seed, split, index)."""
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {_SPLITS}")
    people = world.background if split == "background" else world.new
    records = []
    for i, person in enumerate(people):
        rng = np.random.default_rng([world.config.seed, _SPLITS.index(split), i])
        record = {"name": person.name, "gender": person.gender}
        record.update({a: person.attribute(a) for a in ATTRIBUTES})
        if person.pronoun:
            record["pronoun"] = person.pronoun
        record["bio"] = study_bio(person, world.config.fillers_before_far)
        record["bio_rich"] = pretraining_bio(
            person, rng, num_templates=world.config.rich_templates_per_attribute)
        record["split"] = split
        records.append(record)
    return records


def person_from_record(record: dict[str, str]) -> Person:
    """Inverse of the person part of `world_records` (e.g. after a tfds round trip)."""
    return Person(**{f.name: record[f.name] for f in dataclasses.fields(Person) if f.name != "pronoun"},
                  pronoun=record.get("pronoun", ""))
