"""Answers of a causal LM to the extraction probes: prompts, greedy decoding (alone or mixed with the base
model), and candidate ranking by summed log-probabilities."""
from __future__ import annotations

import math

import numpy as np

from clue_jax.eval import decode, prompts
from clue_jax.extraction import mixing


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Prompt token ids with BOS (unpadded; `padded_prompts` left-pads them)."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[tokenizer.bos_token_id, *e] for e in encoded]


def round_up(n: int, bucket: int = 8) -> int:
    return bucket * math.ceil(n / bucket)


def padded_prompts(tokenizer, seqs_by_split: dict[str, list[list[int]]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Left-padded (ids, mask) per split, one common length: dev and test share one compiled decode."""
    length = round_up(max(len(s) for seqs in seqs_by_split.values() for s in seqs))
    return {sp: decode.left_pad(seqs, tokenizer.pad_token_id, length) for sp, seqs in seqs_by_split.items()}


def base_prompt_texts(items, shots: dict, k: int, seed: int, split_index: int) -> list[str]:
    """k-shot prompts, shots drawn per item from its relation's pool (never the item's own question)."""
    rng = np.random.default_rng([seed, 23, split_index])
    return [prompts.qa_prompt(it.question, prompts.choose_shots(shots.get(it.attribute, []), k, rng,
                                                                exclude_question=it.question) if k else [])
            for it in items]


def newline_ids(tokenizer) -> tuple[int, ...]:
    """Ids of the tokens whose text holds a newline: an answer ends there (decode_to_text cuts at it), so
    decoding may stop there too instead of running on to max_new_tokens."""
    vocab = len(tokenizer)
    return tuple(i for i in range(vocab) if "\n" in tokenizer.decode([i]))


def decode_answers(model, tokenizer, prompt, e, stops=()) -> list[str]:
    ids, mask = prompt
    out = decode.greedy_decode(decode.model_logits_fn(model), ids, mask, max_new_tokens=e.max_new_tokens,
                               eos_id=tokenizer.eos_token_id, stop_ids=stops, batch_size=e.batch_size)
    return decode.decode_to_text(tokenizer, out)


def decode_mixture_answers(ft_model, base_model, tokenizer, ft_prompt, base_prompt, lam, mode, e, stops=()) -> list[str]:
    out = mixing.greedy_decode_mixture(decode.model_logits_fn(ft_model), decode.model_logits_fn(base_model),
                                       *ft_prompt, *base_prompt, lam, mode, max_new_tokens=e.max_new_tokens,
                                       eos_id=tokenizer.eos_token_id, stop_ids=stops,
                                       batch_size=e.batch_size)
    return decode.decode_to_text(tokenizer, out)


def candidate_scores(model, tokenizer, seqs, items, candidates: dict, batch_size: int,
                     bucket: int = 8) -> dict[str, np.ndarray]:
    """Per relation, [n_items_of_relation, n_candidates] summed log-probs of each candidate answer.

    Every (question, candidate) row of every relation is scored once; rows are grouped by their length rounded
    up to `bucket` and each group runs in chunks of `batch_size`, so padding costs little and the number of
    compiled shapes stays small (one per length bucket, shared by all models of one architecture)."""
    fn = decode.model_logits_fn(model)
    rows = []  # (relation, item row within the relation, candidate index, prompt, continuation)
    out = {}
    for rel, cands in candidates.items():
        idx = [i for i, it in enumerate(items) if it.attribute == rel]
        if not idx:
            continue
        conts = tokenizer([" " + c for c in cands], add_special_tokens=False)["input_ids"]
        rows += [(rel, r, c, seqs[i], conts[c]) for r, i in enumerate(idx) for c in range(len(cands))]
        out[rel] = np.zeros((len(idx), len(cands)), np.float32)
    lengths = np.array([round_up(len(p) + len(c), bucket) for _, _, _, p, c in rows])
    for length in np.unique(lengths):
        group = [rows[j] for j in np.flatnonzero(lengths == length)]
        scores = decode.score_continuations(fn, [g[3] for g in group], [g[4] for g in group],
                                            tokenizer.pad_token_id, batch_size=batch_size, length=int(length))
        for (rel, r, c, _, _), value in zip(group, np.asarray(scores, np.float32)):
            out[rel][r, c] = value
    return out


def ranked_predictions(items, candidates: dict, scores: dict[str, np.ndarray]) -> list[str]:
    preds = [""] * len(items)
    for rel, matrix in scores.items():
        idx = [i for i, it in enumerate(items) if it.attribute == rel]
        best = np.argmax(matrix, axis=-1)
        for i, b in zip(idx, best):
            preds[i] = candidates[rel][int(b)]
    return preds


def mixed_ranking(items, candidates, scores_ft, scores_pt, lam, mode) -> list[str]:
    mixed = {rel: mixing.mix_candidate_scores(scores_ft[rel], scores_pt[rel], lam, mode) for rel in scores_ft}
    return ranked_predictions(items, candidates, mixed)
