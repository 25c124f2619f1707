"""Negative log-likelihood of each attribute value inside the intact biography.

Exact match is 0 or 1 per fact and says nothing until a model gets the whole
value right; the NLL of the value's tokens, read in the document the student
learned (teacher forcing, no dropout), moves smoothly as a fact is learned,
so it separates arms that exact match calls equal. A value's NLL is the sum
over the tokens that overlap its characters (nats per value), so values of
different lengths in tokens are each counted once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clue_jax.data import lm_data


@functools.partial(jax.jit, static_argnums=0)
def _token_nll(graphdef, state, ids, mask):
    """nll[b, t] of token t given the tokens before it (0 at t = 0 and at padding)."""
    logits = nnx.merge(graphdef, state)(ids, attention_mask=mask)[:, :-1].astype(jnp.float32)
    logp = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    nll = jnp.where(mask[:, 1:] > 0, -logp, 0.0)
    return jnp.pad(nll, ((0, 0), (1, 0)))


def token_nll(model, ids: np.ndarray, mask: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """float32 [N, T] per-token NLL of `ids` under `model`, in batches of a fixed size (one compile)."""
    graphdef, state = nnx.split(model)
    n = len(ids)
    pad = (-n) % batch_size if n > batch_size else 0
    ids_p = np.concatenate([ids, np.zeros((pad,) + ids.shape[1:], ids.dtype)])
    mask_p = np.concatenate([mask, np.zeros((pad,) + mask.shape[1:], mask.dtype)])
    step = min(batch_size, n)
    out = [np.asarray(_token_nll(graphdef, state, ids_p[i:i + step], mask_p[i:i + step]))
           for i in range(0, len(ids_p), step)]
    return np.concatenate(out)[:n]


def value_positions(tokenizer, text: str, span: tuple[int, int]) -> list[int]:
    """Row positions (after BOS) of the tokens of `text` that overlap the character span [start, end)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    start, end = span
    return [j + 1 for j, (a, b) in enumerate(offsets) if a < end and b > start and b > a]


def per_attribute(model, tokenizer, docs: list[str], spans: list[dict[str, tuple[int, int]]], seq_len: int,
                  batch_size: int = 64) -> dict:
    """{attr: {"nll": mean over documents of the value's summed NLL, "tokens": mean value length},
    "per_person": {attr: [nll per document]}}; spans[i] maps attribute -> character span in docs[i]."""
    data = lm_data.one_per_row(tokenizer, docs, seq_len)
    nll = token_nll(model, data["input_ids"], data["attention_mask"], batch_size)
    per_person: dict[str, list[float]] = {}
    lengths: dict[str, list[int]] = {}
    for i, (text, doc_spans) in enumerate(zip(docs, spans)):
        for attr, span in doc_spans.items():
            pos = value_positions(tokenizer, text, span)
            per_person.setdefault(attr, []).append(float(nll[i, pos].sum()))
            lengths.setdefault(attr, []).append(len(pos))
    table = {a: {"nll": float(np.mean(v)), "tokens": float(np.mean(lengths[a]))} for a, v in per_person.items()}
    table["all"] = {"nll": float(np.mean([x for v in per_person.values() for x in v])),
                    "tokens": float(np.mean([x for v in lengths.values() for x in v]))}
    return {"table": table, "per_person": per_person}
