"""KV-cached incremental forward passes of a `CausalLM`, for decoding and candidate scoring.

A cache holds the rotated keys and the values of every token seen so far, for
every layer, stacked [L, B, S, K, H] like the model's layers, in a fixed
number of slots S (static shapes: one compile per S), plus the key mask of
the slots. `extend` runs T new tokens through the model's own
blocks (their projections, norms, MLPs and rope frequencies; nothing is copied)
attending to the cached slots and themselves, writes their keys/values into the
next T slots and returns their hidden states (a scan over the stacked layers,
the cache in the carry, so each step updates its layer's slice in place); `logits` applies the model's head.
Prefill is `extend` of a whole left-padded prompt into an empty cache, a
decoding step is `extend` of one token.

The slots are the columns of the uncached decoding buffer (prompt in slots
0..P-1, generated token i in slot P+i), and masks, positions (cumsum of the
mask - 1) and sliding windows (in columns) are computed exactly as
`CausalLM.__call__` computes them on that buffer, so cached and uncached
decoding give the same logits up to float rounding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from clue_jax.errors import UserInputError
from clue_jax.models import layers, stacking
from clue_jax.models.causal_lm import CausalLM, period

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@struct.dataclass
class KVCache:
    """keys/values: [L, B, S, K, H]; mask [B, S] int32 (1 = real token); length: slots filled."""

    keys: jax.Array
    values: jax.Array
    mask: jax.Array
    length: jax.Array

    @property
    def slots(self) -> int:
        return self.mask.shape[1]


def init(model: CausalLM, batch: int, slots: int) -> KVCache:
    """An empty cache of `slots` positions for `batch` rows, in the model's compute dtype."""
    cfg = model.cfg
    if cfg.flavour == "gpt2" and slots > cfg.max_len:
        raise UserInputError(f"sequence length {slots} exceeds the GPT-2 model's max_len={cfg.max_len} positions")
    zeros = jnp.zeros((cfg.num_layers, batch, slots, cfg.kv_heads, cfg.head_size), cfg.compute_dtype)
    return KVCache(keys=zeros, values=zeros, mask=jnp.zeros((batch, slots), jnp.int32), length=jnp.int32(0))


def _attend(q, k, v, allowed, scale: float, softcap: float):
    """Grouped-query attention of T queries [B,T,N,H] over S slots [B,S,K,H]; allowed is [B,T,S]."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = layers.softcap(logits, softcap)
    logits = jnp.where(allowed[:, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _attention(attn, x, positions, k_cache, v_cache, start, allowed):
    """One SelfAttention module on T new tokens; returns (output, updated k cache, updated v cache)."""
    cfg = attn.cfg
    b, t, _ = x.shape
    q, k, v = attn.project(x, positions)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, axis=1)
    ok = allowed
    if attn.sliding_window:
        q_idx = start + jnp.arange(t)
        ok = ok & (q_idx[:, None] - jnp.arange(k_cache.shape[1])[None, :] < attn.sliding_window)[None]
    out = _attend(q, k_cache, v_cache, ok, attn.scale, cfg.attn_logit_softcap)
    return attn.o_proj(out.reshape(b, t, -1)), k_cache, v_cache


def _block(block, x, positions, k_cache, v_cache, start, allowed):
    """`Block.__call__` with the cached attention in place of the full one."""
    def attend(y):
        h, k, v = _attention(block.attn, y, positions, k_cache, v_cache, start, allowed)
        return h, (k, v)

    x, (k_cache, v_cache) = block.residual(x, attend)
    return x, k_cache, v_cache


def extend(model: CausalLM, cache: KVCache, input_ids: jax.Array, attention_mask: jax.Array):
    """Runs T new tokens [B, T] (mask [B, T]) after the cached ones; returns (cache, final hidden [B, T, D]).

    The caller keeps `cache.length + T <= cache.slots` (shapes are static, a
    write past the end would be clamped by XLA, not refused).
    """
    t = input_ids.shape[1]
    start = cache.length
    mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask.astype(jnp.int32), start, axis=1)
    positions = jax.lax.dynamic_slice_in_dim(layers.positions_from_mask(mask), start, t, axis=1)
    q_idx = start + jnp.arange(t)
    causal = jnp.arange(cache.slots)[None, :] <= q_idx[:, None]  # [T, S]
    allowed = causal[None] & (mask[:, None, :] > 0)  # [B, T, S]
    x = model._embed(input_ids, positions)
    per_step = period(model.cfg)

    def run(unit, carry, step):
        x, keys, values = carry
        for j, block in enumerate(unit.sublayers()):
            layer = step * per_step + j
            x, k_cache, v_cache = _block(block, x, positions, keys[layer], values[layer], start, allowed)
            keys = jax.lax.dynamic_update_index_in_dim(keys, k_cache, layer, axis=0)
            values = jax.lax.dynamic_update_index_in_dim(values, v_cache, layer, axis=0)
        return (x, keys, values), None

    steps = jnp.arange(model.cfg.num_layers // per_step)
    (x, keys, values), _ = stacking.scan(model.blocks, "none", run, (x, cache.keys, cache.values), steps,
                                         unroll=model.cfg.scan_unroll)
    cache = KVCache(keys=keys, values=values, mask=mask, length=start + t)
    return cache, model.final_norm(x)


def prefill(model: CausalLM, input_ids: jax.Array, attention_mask: jax.Array, slots: int):
    """A cache of `slots` slots holding a left-padded prompt [B, P]; returns (cache, last-token logits [B, V])."""
    cache = init(model, input_ids.shape[0], slots)
    cache, hidden = extend(model, cache, input_ids, attention_mask)
    return cache, model.logits(hidden[:, -1])


def step(model: CausalLM, cache: KVCache, token: jax.Array):
    """One decoding step: token [B] goes into the next slot; returns (cache, its logits [B, V])."""
    cache, hidden = extend(model, cache, token[:, None], jnp.ones_like(token)[:, None])
    return cache, model.logits(hidden[:, 0])


def repeat(cache: KVCache, index: jax.Array) -> KVCache:
    """The cache rows `index` [R] (a prefix shared by several continuations), e.g. candidate answers."""
    return KVCache(keys=jnp.take(cache.keys, index, axis=1), values=jnp.take(cache.values, index, axis=1),
                   mask=jnp.take(cache.mask, index, axis=0), length=cache.length)
