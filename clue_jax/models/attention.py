"""Attention kernels: a fast path for training and a blocked path that also scores.

The fast path is `jax.nn.dot_product_attention` (cuDNN flash attention on GPU,
XLA elsewhere). Gemma-2's logit soft-capping is not expressible there, so a
plain einsum path serves it.

The scoring path is what clue dropout needs: per layer, the attention each key
token *receives*, summed over heads and over the (real) query positions. It
walks over blocks of queries with `lax.scan`, so it holds B x H x block x T
probabilities at a time instead of B x H x T x T, and never returns a T x T
matrix to the caller. Every query row sees all keys inside its block, so one
pass gives the exact softmax (no online rescaling is needed).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    """Asks attention layers to report received attention (see module docstring).

    query_block: queries per scan step; memory grows with T x query_block.
    query_index: optional [B] int positions whose attention row is also
      returned (the paper's analysis view: the token before an attribute).
    """

    query_block: int = 128
    query_index: jax.Array | None = None


def allowed_keys(key_mask: jax.Array, sliding_window: int = 0, causal: bool = True) -> jax.Array:
    """Boolean [B, 1, T, T]: query i may attend key j (causal, real key, in window)."""
    t = key_mask.shape[1]
    q_idx = jnp.arange(t)[:, None]
    k_idx = jnp.arange(t)[None, :]
    ok = jnp.ones((t, t), dtype=bool)
    if causal:
        ok = k_idx <= q_idx
    if sliding_window:
        ok = ok & (q_idx - k_idx < sliding_window)
    return ok[None, None] & (key_mask[:, None, None, :] > 0)


def _logits(q, k, scale, softcap):
    """Grouped-query logits [B, K, G, Tq, Tk] in float32 (queries grouped per kv head)."""
    b, tq, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, tq, kv, n // kv, h)
    logits = jnp.einsum("bqkgh,bskh->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits


def _weighted_values(probs, v, out_dtype):
    b, kv, g, tq, _ = probs.shape
    out = jnp.einsum("bkgqs,bskh->bqkgh", probs.astype(v.dtype), v)
    return out.reshape(b, tq, kv * g, v.shape[-1]).astype(out_dtype)


def attend(q, k, v, allowed, *, scale: float, softcap: float = 0.0, fast: bool = True):
    """Attention output [B, T, N, H]; q is [B, T, N, H], k/v are [B, T, K, H] (K divides N)."""
    if fast and not softcap:
        return jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=scale)
    logits = _logits(q, k, scale, softcap)
    logits = jnp.where(allowed[:, :, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    return _weighted_values(probs, v, q.dtype)


def attend_and_score(q, k, v, key_mask, *, scale: float, softcap: float, sliding_window: int, request: ScoreRequest):
    """Like `attend`, but also returns received-attention column sums.

    Returns (out [B,T,N,H], colsum [B,T] float32, row [B,T] float32 or None):
    colsum[b, j] = sum over heads and real queries i of softmax(q_i k^T)[j];
    row[b, j] = sum over heads of the attention of query `query_index[b]` to j.
    """
    b, t, n, h = q.shape
    blk = min(request.query_block, t)
    pad = (-t) % blk
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qmask = jnp.pad(key_mask, ((0, 0), (0, pad)))
    nblocks = (t + pad) // blk
    q_blocks = qp.reshape(b, nblocks, blk, n, h).swapaxes(0, 1)
    qmask_blocks = qmask.reshape(b, nblocks, blk).swapaxes(0, 1)
    k_idx = jnp.arange(t)
    key_ok = key_mask[:, None, :] > 0  # [B, 1, T]
    query_index = request.query_index

    def step(carry, xs):
        colsum, row = carry
        qb, qm, start = xs
        q_idx = start + jnp.arange(blk)
        ok = k_idx[None, :] <= q_idx[:, None]
        if sliding_window:
            ok = ok & (q_idx[:, None] - k_idx[None, :] < sliding_window)
        ok = ok[None] & key_ok  # [B, blk, T]
        logits = _logits(qb, k, scale, softcap)  # [B, K, G, blk, T]
        logits = jnp.where(ok[:, None, None], logits, _MASKED)
        probs = jax.nn.softmax(logits, axis=-1)
        weights = (qm > 0).astype(jnp.float32)  # padded queries give nothing
        colsum = colsum + jnp.einsum("bkgqs,bq->bs", probs, weights)
        if query_index is not None:
            pick = (q_idx[None, :] == query_index[:, None]).astype(jnp.float32)  # [B, blk]
            row = row + jnp.einsum("bkgqs,bq->bs", probs, pick)
        return (colsum, row), _weighted_values(probs, v, q.dtype)

    zeros = jnp.zeros((b, t), jnp.float32)
    starts = jnp.arange(nblocks) * blk
    (colsum, row), outs = jax.lax.scan(step, (zeros, zeros), (q_blocks, qmask_blocks, starts))
    out = outs.swapaxes(0, 1).reshape(b, nblocks * blk, n, h)[:, :t]
    return out, colsum, (row if query_index is not None else None)
