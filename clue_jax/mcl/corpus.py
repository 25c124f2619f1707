"""The MCL pre-training corpus: biographies of the world's people in the downstream tasks' style, as
one-segment or two-segment encoder rows, and the people split for the downstream tasks."""
from __future__ import annotations

import numpy as np

from clue_jax.data import bios, glue_squad
from clue_jax.data.tokenizer import encode_batch
from clue_jax.errors import UserInputError
from clue_jax.mcl import bios_tasks


def world_people(config) -> dict[str, list[bios.Person]]:
    world = bios.build_world(bios.WorldConfig(**config.world.to_dict()))
    d = config.downstream
    need = d.train_people + d.dev_people + d.test_people
    if need > len(world.new):
        raise UserInputError(f"downstream needs {need} people (train+dev+test) but world.num_new={len(world.new)}")
    new = list(world.new)
    return {"background": list(world.background), "train": new[:d.train_people],
            "dev": new[d.train_people:d.train_people + d.dev_people],
            "test": new[d.train_people + d.dev_people:need]}


def two_segments(text: str) -> tuple[str, str | None]:
    """A text split at the sentence boundary nearest its middle (segment A, segment B); one sentence: (text, None)."""
    cuts = [i + 2 for i in range(len(text) - 2) if text[i] in ".!?" and text[i + 1] == " "]
    if not cuts:
        return text, None
    cut = min(cuts, key=lambda c: abs(2 * c - len(text)))
    return text[:cut].rstrip(), text[cut:]


def encode_corpus(tokenizer, texts, seq_len: int, segments: int) -> dict[str, np.ndarray]:
    """Pre-training rows: segments 1 = [CLS] text [SEP] (type 0); 2 = [CLS] A [SEP] B [SEP] with B of
    type 1, as fine-tuning's pairs. Over-long rows are cut (segments 2: longest segment first, both [SEP] kept)."""
    if segments == 1:
        ids, mask = encode_batch(tokenizer, texts, seq_len, add_bos=True, add_eos=True, on_overflow="truncate")
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    if segments != 2:
        raise UserInputError(f"corpus.segments={segments} must be 1 or 2")
    pairs = [glue_squad.PairExample(str(i), *two_segments(t), label=0) for i, t in enumerate(texts)]
    arrays = glue_squad.encode_pair_examples(tokenizer, pairs, seq_len)
    return {k: arrays[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def itd_capped_share(corpus: dict[str, np.ndarray], insert_rate: float, special: tuple[int, ...]) -> float:
    """Share of corpus rows with less free padding than the insertions ITD asks for (those get fewer)."""
    mask = corpus["attention_mask"] > 0
    free = (mask & ~np.isin(corpus["input_ids"], special)).sum(-1)
    wanted = np.maximum(np.round(insert_rate * free), 1)
    return float(np.mean(mask.shape[1] - mask.sum(-1) < wanted))


def pretraining_texts(people, bios_per_person: int, seed: int, style: dict) -> list[str]:
    """`bios_per_person` biographies per person in `style` (all six attributes), in person order."""
    texts = []
    for i, person in enumerate(people):
        rng = np.random.default_rng([seed, 31, i])
        texts.extend(bios_tasks.bios_context(person, bios.ATTRIBUTES, rng, **style) for _ in range(bios_per_person))
    return texts
