"""Received-attention scores: what clue dropout ranks tokens by (docs/methods.md, "Clue dropout", step 2).

For one example with attention matrices A^{l,h} (causal softmax, layer l, head h):

    A = mean over layers and heads of A^{l,h}                       (T x T)
    s_j = (1 / n_j) * sum_{i >= j, i real} A[i, j]
    n_j = number of real query positions i >= j

`n_j` is T_real - j for right padding and is counted from the mask in general,
so left padding gives the same scores as right padding. Padding scores 0.
This is the *received* attention (column means over the later queries); the
authors' released script summed rows instead, which is identically 1 and
carries no information (docs/methods.md, "Clue dropout").

On sliding-window layers (Gemma-2) A[i, j] is 0 when i - j >= window, and the
normaliser still counts every later real query: s_j stays "the mean attention
j receives from the tokens that follow it", as the paper defines it.

The heavy lifting is `CausalLM.received_attention_sums`, which walks over
query blocks so no T x T matrix is ever held; here we only normalise, jit
and shard it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clue_jax.data.batching import rows_of
from clue_jax.errors import UserInputError
from clue_jax.models import precision
from clue_jax.parallel.rules import activation_mesh, batch_sharding, state_shardings


def _mask_or_ones(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    return jnp.ones_like(input_ids) if attention_mask is None else attention_mask


def later_real_queries(attention_mask: jax.Array) -> jax.Array:
    """n_j = number of real positions i >= j, int32 [B, T] (a reversed cumulative sum)."""
    real = (attention_mask > 0).astype(jnp.int32)
    return jnp.flip(jnp.cumsum(jnp.flip(real, axis=-1), axis=-1), axis=-1)


def received_attention(model, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                       query_block: int = 128) -> jax.Array:
    """s_j as in the module docstring, float32 [B, T]; 0 at padding.

    Traceable (call it inside jit, or use `make_scorer` for the jitted, sharded
    version). `query_block` trades memory (B x heads x block x T probabilities
    live at once) for scan steps; it need not divide T.
    """
    cfg = model.cfg
    mask = _mask_or_ones(input_ids, attention_mask)
    sums = model.received_attention_sums(input_ids, mask, query_block=query_block)
    n = later_real_queries(mask).astype(jnp.float32)
    denom = float(cfg.num_layers * cfg.num_heads) * jnp.maximum(n, 1.0)
    return jnp.where(mask > 0, sums["colsum"] / denom, 0.0).astype(jnp.float32)


def attention_from_query(model, input_ids: jax.Array, attention_mask: jax.Array | None,
                         query_index: jax.Array, query_block: int = 128) -> jax.Array:
    """Mean over layers and heads of the attention row of `query_index` [B], float32 [B, T].

    The paper's analysis view: what a query far from the subject (e.g. the
    token before "company") looks at. Each row sums to 1 over real keys <= query.
    """
    cfg = model.cfg
    mask = _mask_or_ones(input_ids, attention_mask)
    query_index = jnp.broadcast_to(jnp.asarray(query_index, jnp.int32), input_ids.shape[:1])
    sums = model.received_attention_sums(input_ids, mask, query_block=query_block, query_index=query_index)
    return (sums["row"] / float(cfg.num_layers * cfg.num_heads)).astype(jnp.float32)


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def in_dtype(model, dtype):
    """The same teacher with its weights and compute in `dtype` (None: unchanged).

    Cached scoring and live scoring (inside the student's step) both go
    through here, so `clues.teacher_dtype` means the same in every mode.
    """
    if dtype is None:
        return model
    dtype = jnp.dtype(dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda x: x.astype(dtype) if _is_float(x) else x, params)
    cast = nnx.merge(graphdef, params, rest)
    cfg = getattr(model, "cfg", None)
    if cfg is None or not dataclasses.is_dataclass(cfg) or not hasattr(cfg, "dtype"):
        return cast  # not built from a config: its graph stays (weights still stored in `dtype`)
    return precision.regraph(cast, dataclasses.replace(cfg, dtype=dtype.name, param_dtype=dtype.name))


def check_finite(scores: np.ndarray, where: str) -> np.ndarray:
    """Refuses NaN/Inf scores (e.g. a teacher fed token ids beyond its vocabulary) before they are saved."""
    bad = ~np.isfinite(scores)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise UserInputError(f"{where}: {int(bad.sum())} of {scores.size} attention scores are not finite "
                             f"(documents {rows[:5].tolist()}...); check the teacher and its tokenizer")
    return scores


class Scorer:
    """Jitted, optionally sharded `score(input_ids, attention_mask) -> [B, T]` (see make_scorer)."""

    def __init__(self, model, mesh=None, dtype=None, query_block: int = 128):
        model = in_dtype(model, dtype)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.cfg = model.cfg
        self.mesh = mesh
        self.query_block = query_block

        def score(params, rest, input_ids, attention_mask):
            teacher = nnx.merge(graphdef, params, rest)
            with activation_mesh(mesh):  # each device scores its rows: the teacher's weights are gathered
                return received_attention(teacher, input_ids, attention_mask, query_block)

        if mesh is None:
            self._jitted = jax.jit(score)
        else:
            params_sh = state_shardings(params, mesh)
            rest_sh = state_shardings(rest, mesh)
            params = jax.device_put(params, params_sh)
            rest = jax.device_put(rest, rest_sh)
            batch = batch_sharding(mesh)
            self._jitted = jax.jit(
                score, in_shardings=(params_sh, rest_sh, batch, batch), out_shardings=batch
            )
        self._params, self._rest = params, rest

    def _check(self, input_ids, attention_mask):
        shape = tuple(np.shape(input_ids))
        if len(shape) != 2:
            raise UserInputError(f"scoring: input_ids must be [batch, length], got shape {shape}")
        if attention_mask is not None and tuple(np.shape(attention_mask)) != shape:
            raise UserInputError(
                f"scoring: attention_mask shape {tuple(np.shape(attention_mask))} != input_ids shape {shape}"
            )
        if shape[1] > self.cfg.max_len:
            raise UserInputError(
                f"scoring: sequence length {shape[1]} exceeds model.max_len={self.cfg.max_len}"
            )
        if self.mesh is not None:
            shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            if shape[0] % shards:
                raise UserInputError(
                    f"scoring: batch size {shape[0]} is not divisible by the mesh's data*fsdp={shards}"
                )

    def _args(self, input_ids, attention_mask):
        """Every process passes the whole batch; with a mesh each one places only the rows its devices hold."""
        self._check(input_ids, attention_mask)
        if self.mesh is None:
            input_ids = jnp.asarray(input_ids, jnp.int32)
            mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
            return self._params, self._rest, input_ids, mask
        ids = np.asarray(input_ids, np.int32)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
        batch = rows_of({"input_ids": ids, "attention_mask": mask}, self.mesh)
        return self._params, self._rest, batch["input_ids"], batch["attention_mask"]

    def __call__(self, input_ids, attention_mask=None) -> jax.Array:
        return self._jitted(*self._args(input_ids, attention_mask))

    def lower(self, input_ids, attention_mask=None):
        """The jax `Lowered` for these shapes (`.compile().memory_analysis()` for benchmarks)."""
        return self._jitted.lower(*self._args(input_ids, attention_mask))


def make_scorer(model, mesh=None, dtype=None, query_block: int = 128) -> Scorer:
    """Jitted `score(input_ids, attention_mask) -> float32 [B, T]` received attention.

    With a mesh, the teacher's weights are placed by their logical axis names
    (`state_shardings`) and the batch is split over (data, fsdp): this is how
    the large and the small teacher run sharded. `dtype` (e.g. "bfloat16")
    casts the weights and, for ModelConfig models, the compute; softmax and
    the sums stay float32. The model itself is not modified.
    """
    return Scorer(model, mesh=mesh, dtype=dtype, query_block=query_block)


def score_corpus(scorer, input_ids, attention_mask=None, batch_size: int = 8) -> np.ndarray:
    """Scores a tokenised corpus [N, T] in fixed [batch_size, T] batches, float32 [N, T].

    The last batch is padded with empty rows (mask 0), so the scorer compiles
    once; every batch is dispatched before any result is fetched.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise UserInputError(f"score_corpus: input_ids must be [N, T], got shape {input_ids.shape}")
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != input_ids.shape:
        raise UserInputError(f"score_corpus: attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
    if batch_size < 1:
        raise UserInputError(f"score_corpus: batch_size must be >= 1, got {batch_size}")
    n, t = input_ids.shape
    if n == 0:
        return np.zeros((0, t), np.float32)
    pad = (-n) % batch_size
    ids = np.concatenate([input_ids, np.zeros((pad, t), input_ids.dtype)]).astype(np.int32)
    msk = np.concatenate([mask, np.zeros((pad, t), mask.dtype)]).astype(np.int32)
    outs = [scorer(ids[i:i + batch_size], msk[i:i + batch_size]) for i in range(0, n + pad, batch_size)]
    return np.concatenate([_fetch(o) for o in outs])[:n].astype(np.float32)


def _fetch(x: jax.Array) -> np.ndarray:
    """The whole array on this host; a batch sharded over several processes is all-gathered."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
