"""Fact-memorisation evaluation: k-shot QA and cloze probes, EM/F1 per attribute.

Prompts are left-padded to one length bucket and decoded greedily (up to
`max_new_tokens`, cut at the first newline), so a whole evaluation compiles
once per model structure. Works for the built-in world (items carry an
attribute) and for a user's QA file (attribute "all" unless given).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from clue_jax.errors import UserInputError
from clue_jax.eval import decode, metrics, prompts, qa_file


@dataclasses.dataclass(frozen=True)
class Probe:
    question: str  # the prompt text without shots
    answer: str
    attribute: str = "all"
    name: str = ""

    def __post_init__(self):
        problem = qa_file.answer_problem(self.answer)  # a user's file is checked when read, naming its line
        if problem:
            raise ValueError(f"probe {self.question!r}: {problem}")


def _bucket(n: int, size: int = 32) -> int:
    return int(np.ceil(n / size) * size)


def run_probes(model, tokenizer, probes: Sequence[Probe], shots: dict[str, list[tuple[str, str]]] | None = None,
               k: int = 0, seed: int = 0, batch_size: int = 64, max_new_tokens: int = 10,
               cut_at_period: bool = False) -> list[dict]:
    """Decodes an answer for every probe; returns records with prediction, exact_match, f1.

    shots: per attribute, a pool of (question, answer) pairs from other people
    (k are drawn per probe, never the probe's own question). cut_at_period is
    for cloze probes, whose continuation goes on after the value.
    """
    rng = np.random.default_rng(seed)
    texts = []
    for p in probes:
        chosen = prompts.choose_shots(shots.get(p.attribute, []), k, rng, exclude_question=p.question) if k else []
        texts.append(prompts.qa_prompt(p.question, chosen))
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    seqs = [[tokenizer.bos_token_id, *e] for e in encoded]
    check_positions(model, max(len(s) for s in seqs), max_new_tokens)
    ids, mask = decode.left_pad(seqs, tokenizer.pad_token_id, _bucket(max(len(s) for s in seqs)))
    generated = decode.greedy_decode(decode.model_logits_fn(model), ids, mask, max_new_tokens=max_new_tokens,
                                     eos_id=tokenizer.eos_token_id, batch_size=min(batch_size, len(seqs)))
    answers = decode.decode_to_text(tokenizer, generated)
    records = []
    for p, prediction in zip(probes, answers):
        if cut_at_period:
            prediction = prediction.split(". ")[0].rstrip(".")
        records.append({"attribute": p.attribute, "name": p.name, "question": p.question, "answer": p.answer,
                        "prediction": prediction, "exact_match": metrics.exact_match(prediction, p.answer),
                        "f1": metrics.token_f1(prediction, p.answer)})
    return records


def check_positions(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Prompt and answer must fit the model's positions (a base model read from a checkpoint brings its own
    max_len, which the config check before the run cannot know): past them a model decodes nonsense, slowly."""
    max_len = getattr(getattr(model, "cfg", None), "max_len", None)
    if isinstance(max_len, int) and prompt_tokens + max_new_tokens > max_len:
        raise UserInputError(
            f"--config.eval.max_new_tokens={max_new_tokens} after prompts of up to {prompt_tokens} tokens passes "
            f"the model's max_len={max_len} positions: lower --config.eval.max_new_tokens to at most "
            f"{max(max_len - prompt_tokens, 0)} or --config.eval.k_shot")


def per_attribute(records: list[dict]) -> dict[str, dict[str, float]]:
    table = metrics.aggregate(records, key_fn=lambda r: r["attribute"])
    table["all"] = metrics.aggregate(records)["all"]
    return {str(k): v for k, v in table.items()}


def token_distances(tokenizer, texts_and_spans: Sequence[tuple[str, int, dict[str, tuple[int, int]]]]) -> dict[str, float]:
    """Mean distance in tokens from the end of the name to the start of each attribute value.

    texts_and_spans: (text, name_end_char, {attribute: (start, end)}) per document.
    """
    sums: dict[str, list[float]] = {}
    for text, name_end, spans in texts_and_spans:
        for attr, (start, _) in spans.items():
            between = text[name_end:start]
            n = len(tokenizer(between, add_special_tokens=False)["input_ids"])
            acc = sums.setdefault(attr, [0.0, 0])
            acc[0] += n
            acc[1] += 1
    return {a: s / c for a, (s, c) in sums.items()}
