"""Is the head entity the clue? Measures behind the paper's analysis (docs/methods.md, "Clue dropout").

The paper's finding: the tokens the large model attends to more than the
small one are most often the person's name, especially as seen from an
attribute far from it. Two measures, both on host arrays (this is analysis,
not the training path), both comparing against a chance level so a share can
be read honestly:

- `name_share_in_top_contrast`: received-attention contrast d over the
  whole sequence; share of name tokens among the top-k d per example.
- `top_tokens_from_query`: the attention row of one far query (e.g. the
  token just before the company), large minus small; its top-k keys and the
  share of name tokens among them.

Top-k picks the k largest values among the candidate tokens (ties broken by
position, earlier first); when an example has fewer than k candidates, all
of them are taken and the share is over that smaller number. Examples with
no candidate are left out of the average (NaN if none is left).
"""
from __future__ import annotations

import numpy as np

from clue_jax.errors import UserInputError


def _as_2d(name: str, x, shape=None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise UserInputError(f"analysis: {name} must be [batch, length], got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise UserInputError(f"analysis: {name} shape {a.shape} != {shape}")
    return a


def _top_k(values: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices [B, k] of the k largest candidate values (ties by position), -1 where fewer; their values (NaN)."""
    if k < 1:
        raise UserInputError(f"analysis: k must be >= 1, got {k}")
    b, t = values.shape
    idx = np.full((b, k), -1, np.int64)
    val = np.full((b, k), np.nan)
    for e in range(b):
        cand = np.flatnonzero(candidates[e])
        order = cand[np.lexsort((cand, -values[e, cand].astype(np.float64)))][:k]
        idx[e, : len(order)] = order
        val[e, : len(order)] = values[e, order]
    return idx, val


def _shares(idx: np.ndarray, name_mask: np.ndarray) -> np.ndarray:
    """Per example: share of name tokens among the chosen indices (NaN where none was chosen)."""
    out = np.full(idx.shape[0], np.nan)
    for e in range(idx.shape[0]):
        chosen = idx[e][idx[e] >= 0]
        if chosen.size:
            out[e] = float(name_mask[e, chosen].mean())
    return out


def _share(idx: np.ndarray, name_mask: np.ndarray) -> float:
    shares = _shares(idx, name_mask)
    return float(np.nanmean(shares)) if np.isfinite(shares).any() else float("nan")


def name_share_in_top_contrast(d, attention_mask, name_token_mask, k: int = 10) -> float:
    """Mean over examples of (name tokens among the top-k d of the real tokens) / k."""
    d = _as_2d("d", d)
    mask = _as_2d("attention_mask", attention_mask, d.shape) > 0
    names = _as_2d("name_token_mask", name_token_mask, d.shape).astype(bool)
    idx, _ = _top_k(d, mask, k)
    return _share(idx, names)


def chance_per_example(attention_mask, name_token_mask, query_index=None) -> np.ndarray:
    """Per example: name tokens / candidate tokens (NaN without candidates), the share a random choice expects.

    Candidates are the real tokens, or with `query_index` the real tokens before it
    (as in `top_tokens_from_query`).
    """
    mask = _as_2d("attention_mask", attention_mask) > 0
    names = _as_2d("name_token_mask", name_token_mask, mask.shape).astype(bool)
    if query_index is not None:
        mask = mask & (np.arange(mask.shape[1])[None, :] < np.asarray(query_index).reshape(-1, 1))
    n = mask.sum(-1)
    out = np.full(len(n), np.nan)
    out[n > 0] = (names & mask).sum(-1)[n > 0] / n[n > 0]
    return out


def name_share_by_chance(attention_mask, name_token_mask, query_index=None) -> float:
    """Mean over examples of `chance_per_example`."""
    chance = chance_per_example(attention_mask, name_token_mask, query_index)
    return float(np.nanmean(chance)) if np.isfinite(chance).any() else float("nan")


def top_tokens_from_query(row_large, row_small, attention_mask, query_index, k: int = 10,
                          name_token_mask=None, exclude_mask=None) -> dict:
    """Keys that one far query attends to more in the large model than in the small one.

    row_large, row_small: [B, T] mean attention rows of `query_index` [B]
    (`scoring.attention_from_query` of each teacher). Computes per example
    d_row[j] = row_large[j] - row_small[j] over the candidate keys j: real,
    strictly before the query (its attention to itself is not a clue seen
    from afar) and not in `exclude_mask` (e.g. BOS, an attention sink).
    Returns dict(indices [B, k] int, -1 where fewer candidates; values [B, k]
    d_row at those keys, NaN where none; name_share: mean over examples of
    the share of name tokens among the chosen keys, or None without
    `name_token_mask`; shares: that share per example, NaN where no key).
    """
    large = _as_2d("row_large", row_large)
    small = _as_2d("row_small", row_small, large.shape)
    mask = _as_2d("attention_mask", attention_mask, large.shape) > 0
    b, t = large.shape
    q = np.broadcast_to(np.asarray(query_index).reshape(-1), (b,))
    if np.any((q < 0) | (q >= t)):
        raise UserInputError(f"analysis: query_index {q.tolist()} outside [0, {t})")
    candidates = mask & (np.arange(t)[None, :] < q[:, None])
    if exclude_mask is not None:
        candidates &= ~_as_2d("exclude_mask", exclude_mask, large.shape).astype(bool)
    idx, val = _top_k(large - small, candidates, k)
    share, shares = None, None
    if name_token_mask is not None:
        shares = _shares(idx, _as_2d("name_token_mask", name_token_mask, large.shape).astype(bool))
        share = float(np.nanmean(shares)) if np.isfinite(shares).any() else float("nan")
    return {"indices": idx, "values": val, "name_share": share, "shares": shares}
