"""Attention kernels: a fused path for training and evaluation, and a blocked path that also scores.

The fused path (`causal_attention`) is chosen per backend in ONE place,
`plan_attention`: cuDNN flash attention on GPU (`jax.nn.dot_product_attention`
with is_causal, local_window_size and sequence lengths, no dense mask; float32
models run it in bfloat16, the precision cuDNN supports), the Pallas
splash-attention kernel on TPU (which also soft-caps logits, Gemma-2) under
`shard_map` over the mesh's batch and head axes, and XLA on the CPU. cuDNN
has no logit soft-capping, so Gemma-2 on a GPU takes the chunked path: query
blocks under `jax.checkpoint`, each against the keys it can see, so it holds
B x N x block x T logits instead of B x N x T x T, and recomputes them in the
backward pass.
Heads are sharded over the mesh's `tensor` axis: its size must divide the
query heads (or the plan refuses, naming a mesh that works), and kv heads
are repeated just enough to divide it too (as MaxText does), so no device
computes another's heads.
The fused paths read the key mask as sequence lengths / segment ids: a row's
real tokens must be one contiguous run (right padding in training, left
padding in decoding); the cuDNN path rotates rows so that the run starts at
0, except inside `right_padded_rows` (the trainer's step), where it already does.

The scoring path is what clue dropout needs: per layer, the attention each key
token *receives*, summed over heads and over the (real) query positions. It
walks over blocks of queries with `lax.scan`, so it holds about B x H x block
x T probabilities at a time instead of B x H x T x T, and never returns a
T x T matrix to the caller. A step holds every key block its query rows can
see, so one pass gives the exact softmax (no online rescaling is needed), and
key blocks no query can see (above the causal diagonal, outside a sliding
window) are skipped: about half the work of visiting them all.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from clue_jax.errors import UserInputError

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


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """What `causal_attention` runs: an implementation and the static arguments it receives.

    implementation: "cudnn" (jax.nn.dot_product_attention with sequence
      lengths, `kwargs` are its keyword arguments; implementation="xla" takes
      the same ones), "splash" (the Pallas TPU kernel; `kwargs` name its mask,
      soft cap and block size), "chunked" (query blocks under jax.checkpoint,
      the GPU's soft-capped path), "dense" (the [B, 1, T, T] mask path of
      `attend`, the CPU's).
    """

    implementation: str
    kwargs: dict
    interpret: bool = False  # Pallas interpret mode (tests on the CPU)
    mesh_axes: tuple = ()  # (batch axes, head axis) of the context mesh for shard_map; () = none
    compute_dtype: str | None = None  # cuDNN: q, k, v cast to it (float32 models), the output cast back
    kv_repeat: int = 1  # splash: each kv head repeated so that kv heads divide the mesh's tensor axis


_CUDNN_DTYPES = ("bfloat16", "float16")
_SPLASH_BLOCKS = (512, 256, 128)
CHUNK = 512  # query rows per step of the chunked path


def plan_attention(backend: str, *, batch: int, seq_len: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype,
                   scale: float, softcap: float, sliding_window: int, mesh=None, devices: int = 1) -> AttentionPlan:
    """The one place where the attention implementation is chosen for a backend ("cpu", "gpu", "tpu").

    mesh: the context mesh (`jax.sharding.get_abstract_mesh()`); on TPU the
    splash kernel runs under shard_map over it, and is not used on several
    `devices` without one (a Pallas call cannot be partitioned automatically).
    """
    window = (sliding_window - 1, 0) if sliding_window and sliding_window < seq_len else None
    if backend == "gpu":
        if softcap or head_dim % 8 or head_dim > 128:
            return AttentionPlan("chunked", dict(scale=scale, softcap=softcap, block=CHUNK))
        name = jnp.dtype(dtype).name
        return AttentionPlan("cudnn", dict(scale=scale, is_causal=True, local_window_size=window,
                                           implementation="cudnn"),
                             compute_dtype=None if name in _CUDNN_DTYPES else "bfloat16")
    if backend == "tpu":
        block = next((b for b in _SPLASH_BLOCKS if seq_len % b == 0), 0)
        axes, repeat = _mesh_axes(mesh, batch, num_heads, num_kv_heads)
        if block and head_dim % 128 == 0 and (axes or devices == 1):
            return AttentionPlan("splash", dict(scale=scale, softcap=softcap or None, window=window, block=block),
                                 mesh_axes=axes, kv_repeat=repeat)
    return AttentionPlan("dense", dict(scale=scale, softcap=softcap))


def kv_repeat_for(num_heads: int, num_kv_heads: int, tensor: int, where: str = "") -> int:
    """How many times each kv head is repeated so that heads shard over `tensor` devices without replication.

    The query heads must divide over `tensor` (else a one-line error naming a
    tensor size that works); the kv heads are repeated by the smallest factor
    of the group size that makes them divide too (a group's query heads keep
    their kv head).
    """
    if num_heads % tensor:
        works = math.gcd(num_heads, tensor)
        raise UserInputError(f"{num_heads} attention heads do not divide over the mesh's tensor axis of {tensor}"
                             f"{where}: use a tensor size that divides {num_heads} (e.g. {works}, with the other "
                             f"{tensor // works}x on fsdp)")
    group = num_heads // num_kv_heads
    return next(r for r in range(1, group + 1) if group % r == 0 and (num_kv_heads * r) % tensor == 0)


def _mesh_axes(mesh, batch: int, num_heads: int, num_kv_heads: int) -> tuple[tuple, int]:
    """((batch axes, head axis), kv repeat) for a mesh with the project's axis names; ((), 1) when there is none
    or the batch does not divide over its data axes."""
    if mesh is None or mesh.empty or "tensor" not in mesh.axis_names:
        return (), 1
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    if batch % math.prod(mesh.shape[a] for a in batch_axes):
        return (), 1
    shape = ", ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
    return (batch_axes, "tensor"), kv_repeat_for(num_heads, num_kv_heads, mesh.shape["tensor"], f" (mesh {shape})")


_RIGHT_PADDED = contextvars.ContextVar("right_padded_rows", default=False)


def right_padded_rows(fn):
    """`fn` traced with the promise that every row's real tokens start at position 0 (the trainer's batches:
    right padding), so the cuDNN path reads sequence lengths without rotating q, k, v and the output."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        token = _RIGHT_PADDED.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _RIGHT_PADDED.reset(token)

    return traced


def backend() -> str:
    """The platform the fused path is planned for (tests replace it to plan for another backend)."""
    return jax.default_backend()


def mesh_context(mesh):
    """Makes `mesh` the context mesh where a fused kernel needs it for shard_map (TPU); a no-op elsewhere."""
    return jax.set_mesh(mesh) if backend() == "tpu" else contextlib.nullcontext()


def causal_attention(q, k, v, key_mask, *, scale: float, softcap: float = 0.0, sliding_window: int = 0,
                     plan: AttentionPlan | None = None):
    """Causal (optionally windowed, soft-capped) attention [B, T, N, H] on the fused path of this backend.

    key_mask [B, T]: 1 on real tokens, one contiguous run per row. Outputs at
    padded positions are unspecified (they are never read).
    """
    if plan is None:
        b, t, n, h = q.shape
        plan = plan_attention(backend(), batch=b, seq_len=t, num_heads=n, num_kv_heads=k.shape[2], head_dim=h,
                              dtype=q.dtype, scale=scale, softcap=softcap, sliding_window=sliding_window,
                              mesh=jax.sharding.get_abstract_mesh(), devices=jax.device_count())
    if plan.implementation == "dense":
        return attend(q, k, v, allowed_keys(key_mask, sliding_window), **plan.kwargs)
    if plan.implementation == "splash":
        return _splash_attention(q, k, v, key_mask, plan)
    if plan.implementation == "chunked":
        return chunked_attention(q, k, v, key_mask, sliding_window=sliding_window, **plan.kwargs)
    return _lengths_attention(q, k, v, key_mask, plan)


def _lengths_attention(q, k, v, key_mask, plan: AttentionPlan):
    """cuDNN's arguments: sequence lengths describe right padding, so rows whose real run may start later
    (decoding's left padding) are rotated to start at 0, and back."""
    out_dtype, compute = q.dtype, plan.compute_dtype or q.dtype
    lengths = jnp.sum(key_mask > 0, axis=1).astype(jnp.int32)
    first = None if _RIGHT_PADDED.get() else jnp.argmax(key_mask > 0, axis=1).astype(jnp.int32)
    q, k, v = ((x if first is None else _rotate(x, first)).astype(compute) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       **plan.kwargs)
    return (out if first is None else _rotate(out, -first)).astype(out_dtype)


def chunked_attention(q, k, v, key_mask, *, scale: float, softcap: float, sliding_window: int, block: int):
    """`attend` one block of `block` queries at a time, each against the keys it can see (all of them, or the
    span a sliding window reaches), under jax.checkpoint: the backward pass recomputes a block's logits
    instead of keeping B x N x T x T of them. Exact softmax per query row (every visible key is in its step).
    """
    b, t, n, h = q.shape
    blk = min(block, t)
    padded = t + (-t) % blk
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - t)) + ((0, 0),) * (x.ndim - 2))
    q, k, v, real = pad(q), pad(k), pad(v), pad(key_mask > 0)
    span = padded
    if sliding_window:
        span = min(padded, -(-(sliding_window - 1) // blk) * blk + blk)

    @jax.checkpoint
    def one_block(i):
        start = jnp.clip((i + 1) * blk - span, 0, padded - span)
        qb = jax.lax.dynamic_slice_in_dim(q, i * blk, blk, axis=1)
        kb, vb, rb = (jax.lax.dynamic_slice_in_dim(x, start, span, axis=1) for x in (k, v, real))
        qpos, kpos = i * blk + jnp.arange(blk)[:, None], start + jnp.arange(span)[None, :]
        ok = kpos <= qpos
        if sliding_window:
            ok = ok & (qpos - kpos < sliding_window)
        ok = ok[None, None] & rb[:, None, None, :]  # [B, 1, blk, span]
        logits = jnp.where(ok[:, :, None], _logits(qb, kb, scale, softcap), _MASKED)
        return _weighted_values(jax.nn.softmax(logits, axis=-1), vb, qb.dtype)

    out = jax.lax.map(one_block, jnp.arange(padded // blk))  # [blocks, B, blk, N, H]
    return out.swapaxes(0, 1).reshape(b, padded, n, h)[:, :t]


def _rotate(x, shift):
    """Row b of x [B, T, ...] rotated left by shift[b] along T."""
    t = x.shape[1]
    idx = (jnp.arange(t)[None, :] + shift[:, None]) % t
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.lru_cache(maxsize=64)
def _splash_kernel(seq_len: int, num_heads: int, window, softcap, block: int, interpret: bool):
    shape = (seq_len, seq_len)
    one = splash_mask.LocalMask(shape, window, offset=0) if window else splash_mask.CausalMask(shape)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    return splash.make_splash_mha(splash_mask.MultiHeadMask([one] * num_heads), block_sizes=sizes,
                                  attn_logits_soft_cap=softcap, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_attention(q, k, v, key_mask, plan: AttentionPlan):
    """Splash attention: heads-major per example (vmap over batch); padding by segment ids (real 1, pad 0)."""
    kw = plan.kwargs

    def local(q, k, v, segments):
        kernel = _splash_kernel(q.shape[1], q.shape[2], kw["window"], kw["softcap"], kw["block"], plan.interpret)

        def one(q, k, v, seg):
            ids = splash.SegmentIds(q=seg, kv=seg)
            return kernel((q * kw["scale"]).astype(q.dtype), k, v, segment_ids=ids)

        out = jax.vmap(one)(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), segments)
        return out.swapaxes(1, 2)

    segments = (key_mask > 0).astype(jnp.int32)
    if plan.kv_repeat > 1:  # kv heads that divide the tensor axis; a group's query heads keep their kv head
        k, v = (jnp.repeat(x, plan.kv_repeat, axis=2) for x in (k, v))
    if not plan.mesh_axes:
        return local(q, k, v, segments)
    batch_axes, heads_axis = plan.mesh_axes
    spec = P(batch_axes, None, heads_axis, None)
    return jax.shard_map(local, in_specs=(spec, spec, spec, P(batch_axes, None)), out_specs=spec,
                         check_vma=False)(q, k, v, segments)


def score_schedule(nblocks: int, block: int, sliding_window: int) -> tuple[np.ndarray, ...]:
    """The (query block, key block) pairs that scoring visits, grouped into equal-sized scan steps.

    Only key blocks that some query of the block can see are listed: the causal
    triangle, and inside a sliding window only the blocks it reaches. Causal:
    query blocks i and n-1-i share a step (i+1 + n-i = n+1 pairs, the triangle
    folded into a rectangle). Windowed: one query block per step with the
    ceil((w-1)/block)+1 key blocks its window spans, when that visits fewer.
    Returns numpy arrays (static): slot_q [S, 2] query block of each slot,
    slot_live [S, 2], pair_slot [S, P], pair_kb [S, P], pair_live [S, P].
    """
    causal = [[i, nblocks - 1 - i] if i != nblocks - 1 - i else [i] for i in range((nblocks + 1) // 2)]
    steps = causal
    if sliding_window:
        span = min(nblocks, -(-(sliding_window - 1) // block) + 1)
        if nblocks * span < len(causal) * (nblocks + 1):
            steps = [[i] for i in range(nblocks)]
    pairs = []
    for slots in steps:
        step = []
        for slot, qb in enumerate(slots):
            first = 0
            if sliding_window:
                first = max(0, (qb * block - (sliding_window - 1)) // block)
            step += [(slot, kb) for kb in range(first, qb + 1)]
        pairs.append(step)
    width = max(len(p) for p in pairs)
    slot_q = np.zeros((len(steps), 2), np.int32)
    slot_live = np.zeros((len(steps), 2), bool)
    pair_slot = np.zeros((len(steps), width), np.int32)
    pair_kb = np.zeros((len(steps), width), np.int32)
    pair_live = np.zeros((len(steps), width), bool)
    for s, (slots, step) in enumerate(zip(steps, pairs)):
        slot_q[s, :len(slots)] = slots
        slot_live[s, :len(slots)] = True
        for p, (slot, kb) in enumerate(step):
            pair_slot[s, p], pair_kb[s, p], pair_live[s, p] = slot, kb, True
    return slot_q, slot_live, pair_slot, pair_kb, pair_live


def attend_and_score(q, k, v, key_mask, *, scale: float, softcap: float, sliding_window: int, request: ScoreRequest):
    """Like `attend`, but also returns received-attention column sums.

    Returns (out [B,T,N,H], colsum [B,T] float32, row [B,T] float32 or None):
    colsum[b, j] = sum over heads and real queries i of softmax(q_i k^T)[j];
    row[b, j] = sum over heads of the attention of query `query_index[b]` to j.
    Each scan step holds all the visible key blocks of its query blocks
    (`score_schedule`), so one pass gives the exact softmax; hidden blocks are
    never computed. Outputs at padded query positions are unspecified.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    blk = min(request.query_block, t)
    pad = (-t) % blk
    nblocks = (t + pad) // blk

    def blocks(x):  # [B, T, ...] -> [nblocks, B, blk, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(b, nblocks, blk, *x.shape[2:]).swapaxes(0, 1)

    q_blocks, k_blocks, v_blocks = blocks(q), blocks(k), blocks(v)
    mask_blocks = blocks(key_mask > 0)  # [nb, B, blk]: real keys, and real queries
    query_index = request.query_index
    offsets = jnp.arange(blk)

    def step(carry, xs):
        colsum, row, out = carry
        slot_q, slot_live, pair_slot, pair_kb, pair_live = xs
        pair_qb = slot_q[pair_slot]
        qpos = pair_qb[:, None] * blk + offsets  # [P, blk]
        kpos = pair_kb[:, None] * blk + offsets
        ok = (kpos[:, None, :] <= qpos[:, :, None]) & pair_live[:, None, None]
        if sliding_window:
            ok = ok & (qpos[:, :, None] - kpos[:, None, :] < sliding_window)
        ok = ok[:, None] & mask_blocks[pair_kb][:, :, None, :]  # [P, B, blk_q, blk_k]
        qp = q_blocks[pair_qb].reshape(-1, b, blk, kv, n // kv, h)
        logits = jnp.einsum("pbqkgh,pbskh->pbkgqs", qp, k_blocks[pair_kb], preferred_element_type=jnp.float32)
        logits = logits * scale
        if softcap:
            logits = jnp.tanh(logits / softcap) * softcap
        ok = ok[:, :, None, None]
        logits = jnp.where(ok, logits, _MASKED)
        to_slot = jax.nn.one_hot(pair_slot, 2, dtype=jnp.float32)  # [P, 2]
        pair_max = jnp.max(logits, axis=-1)  # [P, B, K, G, blk]
        slot_max = jnp.stack([jnp.max(jnp.where((pair_slot == s)[:, None, None, None, None], pair_max, _MASKED), 0)
                              for s in (0, 1)])
        e = jnp.where(ok, jnp.exp(logits - slot_max[pair_slot][..., None]), 0.0)
        denom = jnp.einsum("pbkgq,pt->tbkgq", jnp.sum(e, axis=-1), to_slot)
        probs = e / jnp.maximum(denom[pair_slot], 1e-30)[..., None]
        weights = mask_blocks[pair_qb].astype(jnp.float32)  # [P, B, blk]: padded queries give nothing
        colsum = colsum.at[pair_kb].add(jnp.einsum("pbkgqs,pbq->pbs", probs, weights))
        if query_index is not None:
            pick = (qpos[:, None, :] == query_index[None, :, None]).astype(jnp.float32)  # [P, B, blk]
            row = row.at[pair_kb].add(jnp.einsum("pbkgqs,pbq->pbs", probs, pick))
        pv = jnp.einsum("pbkgqs,pbskh->pbqkgh", probs.astype(v.dtype), v_blocks[pair_kb])
        per_slot = jnp.einsum("pbqkgh,pt->tbqkgh", pv, to_slot.astype(pv.dtype)).reshape(2, b, blk, n, h)
        out = out.at[slot_q].add(per_slot * slot_live[:, None, None, None, None].astype(per_slot.dtype))
        return (colsum, row, out), None

    zeros = jnp.zeros((nblocks, b, blk), jnp.float32)
    out0 = jnp.zeros((nblocks, b, blk, n, h), q.dtype)
    schedule = tuple(jnp.asarray(x) for x in score_schedule(nblocks, blk, sliding_window))
    (colsum, row, out), _ = jax.lax.scan(step, (zeros, zeros, out0), schedule)
    unblock = lambda x: x.swapaxes(0, 1).reshape(b, nblocks * blk, *x.shape[3:])[:, :t]
    return unblock(out), unblock(colsum), (unblock(row) if query_index is not None else None)
