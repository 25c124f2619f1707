"""Greedy decoding and continuation scoring for any causal LM, jitted with fixed shapes.

Everything here takes a *logits function* `logits_fn(input_ids, attention_mask)
-> logits [B, T, V]`, so it works with any model class and with a mixture of
two models (`clue_jax.extraction.mixing`). The model is expected to derive
position ids from the mask (`cumsum(mask) - 1`), so prompts are LEFT-padded:
the last prompt token of every row sits in the same column and generation
appends to the right.

Compilation and weights. The jitted entry points take the logits function as a
*pytree argument* (`jax.tree_util.Partial`): its function is static, its
arguments are traced. Hence
- a plain Python function (closure) is wrapped as `Partial(fn)`: compiled once
  per function object and shape; whatever it closes over is baked into the
  compiled program as constants, so a closure over model weights does NOT see
  later in-place weight updates. Fine for fixed weights and tests.
- `model_logits_fn(model)` (any Flax NNX module called as
  `model(ids, attention_mask=mask)`) returns a `Partial` whose weights travel
  as jit arguments: one compile per model structure and shape, weights never
  baked in, updates seen. Use it for real models (and call `model.eval()`
  first if it has dropout).
- any other `Partial(f, *arrays)` works the same way.
Shapes: use `batch_size` so every chunk has the same batch dimension (the last
one is padded by repeating a row), and the same prompt length across calls
(`left_pad(..., length=...)`) to get exactly one compile.

No KV cache: each decoding step runs the model on the whole [B, P + N] buffer
(future slots masked out). With the short answers of QA evaluation (N <= 10)
this costs little and needs nothing from the model beyond its forward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from clue_jax.errors import UserInputError

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]

FILL_ID = -1
"""Value of generated slots after a stop token (and never a real token id)."""


# ---------------------------------------------------------------------------
# Inputs


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token id lists to a common length; returns int32 (ids, mask) of shape [B, L].

    `length` fixes L (to reuse one compiled program across data sets); by
    default L is the longest sequence. Empty sequences are refused: a causal
    LM needs at least one token to predict from.
    """
    if len(seqs) == 0:
        raise UserInputError("no sequences to pad: the prompt list is empty")
    lengths = [len(s) for s in seqs]
    for i, n in enumerate(lengths):
        if n == 0:
            raise UserInputError(f"sequence {i} is empty: a prompt needs at least one token")
    width = max(lengths) if length is None else length
    if max(lengths) > width:
        i = int(np.argmax(lengths))
        raise UserInputError(f"sequence {i} has {lengths[i]} tokens, more than the padded length {width}")
    ids = np.full((len(seqs), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), width), dtype=np.int32)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = np.asarray(s, dtype=np.int32)
        mask[i, width - len(s):] = 1
    return ids, mask


def as_pytree_fn(logits_fn: Callable) -> Partial:
    """Wraps a callable so it can be passed to jit as an argument (see module doc).

    An NNX module passed directly goes through `model_logits_fn`, so its
    weights are never baked into the compiled program.
    """
    if isinstance(logits_fn, Partial):
        return logits_fn
    from flax import nnx

    if isinstance(logits_fn, nnx.Module):
        return model_logits_fn(logits_fn)
    return Partial(logits_fn)


def _call_merged(graphdef: Any, state: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    from flax import nnx  # local: keep this module importable without flax for pure-numpy users

    return nnx.merge(graphdef, state)(input_ids, attention_mask=attention_mask)


def model_logits_fn(model: Any) -> Partial:
    """A logits function for an NNX module whose weights are jit arguments, not constants.

    The graph definition (static, hashable) is part of the pytree structure,
    so equal model structures share one compiled program; the state is
    re-read at each call of this function, so take a fresh one after training.
    """
    from flax import nnx

    graphdef, state = nnx.split(model)
    return Partial(_call_merged, graphdef, state)


def check_prompts(ids: np.ndarray, mask: np.ndarray, name: str = "prompt") -> tuple[np.ndarray, np.ndarray]:
    """Host-side check that a prompt batch is [B, P], non-empty and left-padded; returns int32 copies."""
    ids = np.asarray(ids, dtype=np.int32)
    mask = np.asarray(mask, dtype=np.int32)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"{name}_ids {ids.shape} and {name}_mask {mask.shape} must both be [B, P]")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise UserInputError(f"{name}: empty batch or zero-length prompts {ids.shape}")
    if not np.all(mask[:, -1] == 1):
        raise ValueError(f"{name}s must be LEFT-padded: the last column of {name}_mask must be all 1 (use left_pad)")
    return ids, mask


def stop_set(eos_id: int | None, stop_ids: Sequence[int]) -> tuple[int, ...]:
    """EOS and stop ids as one sorted tuple: hashable, so it can be a static jit argument."""
    stops = set(int(s) for s in stop_ids)
    if eos_id is not None:
        stops.add(int(eos_id))
    return tuple(sorted(stops))


# ---------------------------------------------------------------------------
# Chunking: fixed batch shapes, one compile


def run_in_chunks(fn: Callable[..., jax.Array], arrays: Sequence[np.ndarray], batch_size: int | None) -> np.ndarray:
    """Applies `fn(*chunk_arrays)` over batch chunks of equal size and concatenates.

    The last chunk is padded by repeating its first row (a valid input, so no
    NaN or degenerate masks), and the padded rows are dropped from the result.
    All chunks share one shape, hence one compile. `batch_size=None` runs the
    whole batch at once.
    """
    n = arrays[0].shape[0]
    if batch_size is None or batch_size <= 0:
        return np.asarray(fn(*arrays))
    outs = []
    for start in range(0, n, batch_size):
        chunk = [a[start:start + batch_size] for a in arrays]
        short = batch_size - chunk[0].shape[0]
        if short:
            chunk = [np.concatenate([c, np.repeat(c[:1], short, axis=0)], axis=0) for c in chunk]
        outs.append(fn(*chunk))  # device arrays: dispatch all chunks before the first host copy
    return np.concatenate([np.asarray(o) for o in outs], axis=0)[:n]


# ---------------------------------------------------------------------------
# Greedy decoding


def greedy_loop(
    next_logits: Callable[[tuple, tuple, tuple], jax.Array],
    prompts: tuple[tuple[jax.Array, jax.Array], ...],
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    fill_id: int,
) -> jax.Array:
    """The fixed-shape greedy loop shared by single-model and mixture decoding (call under jit).

    `prompts` holds one left-padded (ids, mask) pair per model, all with the
    same batch; each gets a [B, P_k + N] buffer. At step i,
    `next_logits(buffers, masks, last_positions)` scores the next token
    ([B, V]); the argmax is written into every buffer at column P_k + i. A
    `lax.while_loop` stops early once every row has emitted a stop token.
    Returns [B, N] int32; slots after a row's stop token hold `fill_id`.
    """
    batch = prompts[0][0].shape[0]
    lengths = tuple(ids.shape[1] for ids, _ in prompts)
    pad = jnp.zeros((batch, max_new_tokens), jnp.int32)
    bufs = tuple(jnp.concatenate([ids.astype(jnp.int32), pad], axis=1) for ids, _ in prompts)
    masks = tuple(jnp.concatenate([m.astype(jnp.int32), pad], axis=1) for _, m in prompts)
    out = jnp.full((batch, max_new_tokens), fill_id, jnp.int32)
    done = jnp.zeros((batch,), bool)
    stops = jnp.asarray(stop_ids, jnp.int32) if stop_ids else None

    def cond(carry):
        i, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, bufs, masks, out, done = carry
        logits = next_logits(bufs, masks, tuple(p - 1 + i for p in lengths))
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out = out.at[:, i].set(jnp.where(done, fill_id, token))
        bufs = tuple(b.at[:, p + i].set(token) for b, p in zip(bufs, lengths))
        masks = tuple(m.at[:, p + i].set(1) for m, p in zip(masks, lengths))
        if stops is not None:
            done = done | jnp.isin(token, stops)
        return i + 1, bufs, masks, out, done

    carry = (jnp.int32(0), bufs, masks, out, done)
    return jax.lax.while_loop(cond, body, carry)[3]


def last_logits(logits_fn: LogitsFn, ids: jax.Array, mask: jax.Array, position: jax.Array) -> jax.Array:
    """The logits at one (traced) column: [B, V] in float32."""
    logits = logits_fn(ids, mask)
    return jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "stop_ids", "fill_id"))
def _greedy_jit(logits_fn, ids, mask, *, max_new_tokens, stop_ids, fill_id):
    def next_logits(bufs, masks, positions):
        return last_logits(logits_fn, bufs[0], masks[0], positions[0])

    return greedy_loop(next_logits, ((ids, mask),), max_new_tokens, stop_ids, fill_id)


def greedy_decode(
    logits_fn: LogitsFn,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    max_new_tokens: int = 10,
    eos_id: int | None = None,
    stop_ids: Sequence[int] = (),
    batch_size: int | None = None,
    fill_id: int = FILL_ID,
) -> np.ndarray:
    """Greedy continuation of left-padded prompts: int32 [B, max_new_tokens].

    The EOS / stop token itself is kept; every slot after it is `fill_id`
    (default -1, never a token id, dropped by `decode_to_text`). Ties in the
    argmax go to the lowest token id. See the module doc for compilation.
    """
    ids, mask = check_prompts(prompt_ids, prompt_mask)
    fn = as_pytree_fn(logits_fn)
    stops = stop_set(eos_id, stop_ids)

    def run(i, m):
        return _greedy_jit(fn, i, m, max_new_tokens=int(max_new_tokens), stop_ids=stops, fill_id=int(fill_id))

    return run_in_chunks(run, (ids, mask), batch_size)


def decode_to_text(tokenizer: Any, generated_ids: np.ndarray, cut_at: str | None = "\n") -> list[str]:
    """Decodes generated rows to answers: drop fill slots, cut at the first `cut_at`, strip.

    `tokenizer` is anything with `decode(ids, skip_special_tokens=True)`
    (a `tokenizers.Tokenizer` or a transformers tokenizer). Special tokens
    such as EOS are skipped, so an EOS stop leaves no trace in the text.
    """
    texts = []
    for row in np.asarray(generated_ids):
        ids = [int(t) for t in row if t >= 0]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if cut_at:
            text = text.split(cut_at, 1)[0]
        texts.append(text.strip())
    return texts


# ---------------------------------------------------------------------------
# Continuation scoring


@jax.jit
def _score_jit(logits_fn, ids, mask, target_mask):
    logits = logits_fn(ids, mask)[:, :-1].astype(jnp.float32)
    targets = ids[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    token_logp = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(jnp.where(target_mask[:, 1:] > 0, token_logp, 0.0), axis=-1)


def score_continuations(
    logits_fn: LogitsFn,
    prompt_ids_list: Sequence[Sequence[int]],
    continuation_ids_list: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int | None = None,
    length: int | None = None,
) -> np.ndarray:
    """Summed log-probability of each continuation given its prompt: float32 [n].

    Each prompt + continuation is one left-padded row, scored in one forward
    pass; only the continuation tokens count. An empty continuation scores
    0.0 (log 1). `length` fixes the padded row length (one compile across
    calls); `batch_size` fixes the batch dimension.
    """
    if len(prompt_ids_list) != len(continuation_ids_list):
        raise ValueError(f"{len(prompt_ids_list)} prompts but {len(continuation_ids_list)} continuations")
    for i, p in enumerate(prompt_ids_list):
        if len(p) == 0:
            raise UserInputError(f"prompt {i} is empty: the first continuation token needs a context")
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids_list, continuation_ids_list)]
    ids, mask = left_pad(seqs, pad_id, length)
    target = np.zeros_like(mask)
    width = ids.shape[1]
    for i, c in enumerate(continuation_ids_list):
        if len(c):
            target[i, width - len(c):] = 1
    fn = as_pytree_fn(logits_fn)
    return run_in_chunks(lambda a, b, c: _score_jit(fn, a, b, c), (ids, mask, target), batch_size)
