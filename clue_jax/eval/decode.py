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

KV cache. For a `CausalLM` (from `model_logits_fn`, or passed directly) the
prompt is read once into a fixed-size cache (`clue_jax.models.kv_cache`) and
each step runs one token; `score_continuations` reads each distinct prompt
once and scores its continuations from the cached prefix. Any other logits
function (or `kv_cache=False`) reruns the model on the whole [B, P + N]
buffer at every step (future slots masked), needing nothing but a forward pass.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Decoder:
    """How one model advances during decoding (built under jit, never a jit argument).

    start(ids, mask) -> (carry, logits [B, V]) reads the left-padded prompt;
    step(carry, token [B]) -> (carry, logits [B, V]) appends one token.
    """

    start: Callable[[jax.Array, jax.Array], tuple[Any, jax.Array]]
    step: Callable[[Any, jax.Array], tuple[Any, jax.Array]]


def buffer_decoder(logits_fn: LogitsFn, max_new_tokens: int) -> Decoder:
    """No cache: every step reruns the model on the whole [B, P + N] buffer (future slots masked)."""

    def start(ids, mask):
        pad = jnp.zeros((ids.shape[0], max_new_tokens), jnp.int32)
        buf = jnp.concatenate([ids.astype(jnp.int32), pad], axis=1)
        m = jnp.concatenate([mask.astype(jnp.int32), pad], axis=1)
        col = jnp.int32(ids.shape[1] - 1)
        return (buf, m, col), last_logits(logits_fn, buf, m, col)

    def step(carry, token):
        buf, m, col = carry
        col = col + 1
        buf = jax.lax.dynamic_update_slice_in_dim(buf, token[:, None], col, axis=1)
        m = jax.lax.dynamic_update_slice_in_dim(m, jnp.ones_like(token)[:, None], col, axis=1)
        return (buf, m, col), last_logits(logits_fn, buf, m, col)

    return Decoder(start, step)


def cached_model(logits_fn: Partial):
    """The CausalLM behind `model_logits_fn(model)` (call under jit), or None for any other logits function."""
    if not (isinstance(logits_fn, Partial) and logits_fn.func is _call_merged):
        return None
    from flax import nnx

    from clue_jax.models.causal_lm import CausalLM

    model = nnx.merge(*logits_fn.args)
    return model if isinstance(model, CausalLM) else None


def make_decoder(logits_fn: Partial, max_new_tokens: int, kv_cache: bool) -> Decoder:
    """A KV-cached decoder for a CausalLM's logits function (when `kv_cache`), else the buffer decoder."""
    model = cached_model(logits_fn) if kv_cache else None
    if model is None:
        return buffer_decoder(logits_fn, max_new_tokens)
    from clue_jax.models import kv_cache as kv

    def start(ids, mask):
        return kv.prefill(model, ids, mask, ids.shape[1] + max_new_tokens)

    return Decoder(start, lambda cache, token: kv.step(model, cache, token))


def greedy_loop(
    decoders: tuple[Decoder, ...],
    prompts: tuple[tuple[jax.Array, jax.Array], ...],
    combine: Callable[[tuple[jax.Array, ...]], jax.Array],
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    fill_id: int,
) -> jax.Array:
    """The fixed-shape greedy loop shared by single-model and mixture decoding (call under jit).

    `prompts` holds one left-padded (ids, mask) pair per decoder, all with the
    same batch. Each decoder reads its prompt once; then at every step
    `combine(per-decoder logits)` ([B, V] each) scores the next token and its
    argmax is appended for every decoder. A `lax.while_loop` stops early once
    every row has emitted a stop token. Returns [B, N] int32; slots after a
    row's stop token hold `fill_id`.
    """
    batch = prompts[0][0].shape[0]
    out = jnp.full((batch, max_new_tokens), fill_id, jnp.int32)
    if max_new_tokens == 0:
        return out
    stops = jnp.asarray(stop_ids, jnp.int32) if stop_ids else None

    def pick(logits, i, out, done):
        token = jnp.argmax(combine(logits), axis=-1).astype(jnp.int32)
        out = out.at[:, i].set(jnp.where(done, fill_id, token))
        if stops is not None:
            done = done | jnp.isin(token, stops)
        return token, out, done

    started = [d.start(ids, mask) for d, (ids, mask) in zip(decoders, prompts)]
    carries = tuple(c for c, _ in started)
    token, out, done = pick(tuple(lg for _, lg in started), 0, out, jnp.zeros((batch,), bool))

    def cond(loop):
        i, _, _, _, done = loop
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(loop):
        i, carries, token, out, done = loop
        stepped = [d.step(c, token) for d, c in zip(decoders, carries)]
        token, out, done = pick(tuple(lg for _, lg in stepped), i, out, done)
        return i + 1, tuple(c for c, _ in stepped), token, out, done

    return jax.lax.while_loop(cond, body, (jnp.int32(1), carries, token, out, done))[3]


def last_logits(logits_fn: LogitsFn, ids: jax.Array, mask: jax.Array, position: jax.Array) -> jax.Array:
    """The logits at one (traced) column: [B, V] in float32."""
    logits = logits_fn(ids, mask)
    return jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "stop_ids", "fill_id", "kv_cache"))
def _greedy_jit(logits_fn, ids, mask, *, max_new_tokens, stop_ids, fill_id, kv_cache):
    decoder = make_decoder(logits_fn, max_new_tokens, kv_cache)
    return greedy_loop((decoder,), ((ids, mask),), lambda logits: logits[0], max_new_tokens, stop_ids, fill_id)


def greedy_decode(
    logits_fn: LogitsFn,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    max_new_tokens: int = 10,
    eos_id: int | None = None,
    stop_ids: Sequence[int] = (),
    batch_size: int | None = None,
    fill_id: int = FILL_ID,
    kv_cache: bool = True,
) -> np.ndarray:
    """Greedy continuation of left-padded prompts: int32 [B, max_new_tokens].

    The EOS / stop token itself is kept; every slot after it is `fill_id`
    (default -1, never a token id, dropped by `decode_to_text`). Ties in the
    argmax go to the lowest token id. A CausalLM (passed directly or through
    `model_logits_fn`) decodes with a KV cache unless `kv_cache=False`; other
    logits functions rerun the whole buffer. See the module doc for compilation.
    """
    ids, mask = check_prompts(prompt_ids, prompt_mask)
    fn = as_pytree_fn(logits_fn)
    stops = stop_set(eos_id, stop_ids)

    def run(i, m):
        return _greedy_jit(fn, i, m, max_new_tokens=int(max_new_tokens), stop_ids=stops, fill_id=int(fill_id),
                           kv_cache=bool(kv_cache))

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


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("slots",))
def _prefill_jit(logits_fn, ids, mask, *, slots):
    from clue_jax.models import kv_cache as kv

    cache, logits = kv.prefill(cached_model(logits_fn), ids, mask, slots)
    return cache, jax.nn.log_softmax(logits, axis=-1)


@jax.jit
def _score_cached_jit(logits_fn, cache, last_logp, index, cont, cont_mask):
    """Summed log-probs of right-padded continuations [R, C] after the cached prompts `index` [R]."""
    from clue_jax.models import kv_cache as kv

    model = cached_model(logits_fn)
    _, hidden = kv.extend(model, kv.repeat(cache, index), cont, cont_mask)
    logp = jax.nn.log_softmax(model.logits(hidden[:, :-1]), axis=-1)  # predicts cont[:, 1:]
    logp = jnp.concatenate([last_logp[index][:, None], logp], axis=1)  # the prompt predicts cont[:, 0]
    picked = jnp.take_along_axis(logp, cont[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(cont_mask > 0, picked, 0.0), axis=-1)


def _score_shared_prompts(fn: Partial, prompts: list, continuations: Sequence[Sequence[int]], pad_id: int,
                          batch_size: int | None, max_slots: int | None) -> np.ndarray:
    """score_continuations with a KV cache: each distinct prompt is read once, its continuations from the cache.

    Prompts are left-padded to a multiple of 8 and continuations right-padded
    to a multiple of 4 tokens, so nearby sizes share one compile (exact sizes
    where that would pass `max_slots`, GPT-2's learned positions).
    """
    unique: dict[tuple, int] = {}
    which = np.array([unique.setdefault(p, len(unique)) for p in prompts], np.int32)
    longest, width = max(len(p) for p in unique), max(1, max(len(c) for c in continuations))
    if max_slots is None or _round_up(longest, 8) + _round_up(width, 4) <= max_slots:
        longest, width = _round_up(longest, 8), _round_up(width, 4)
    ids, mask = left_pad(list(unique), pad_id, longest)
    cont = np.full((len(prompts), width), pad_id, np.int32)
    cont_mask = np.zeros_like(cont)
    for i, c in enumerate(continuations):
        cont[i, :len(c)] = c
        cont_mask[i, :len(c)] = 1
    step = len(unique) if batch_size is None or batch_size <= 0 else batch_size
    out = np.zeros(len(prompts), np.float32)
    for start in range(0, len(unique), step):
        chunk = [a[start:start + step] for a in (ids, mask)]
        if chunk[0].shape[0] < step:  # one shape for every chunk: repeat a row
            chunk = [np.concatenate([a, np.repeat(a[:1], step - a.shape[0], axis=0)]) for a in chunk]
        cache, last_logp = _prefill_jit(fn, *chunk, slots=ids.shape[1] + width)
        rows = np.flatnonzero((which >= start) & (which < start + step))
        out[rows] = run_in_chunks(lambda i, c, m: _score_cached_jit(fn, cache, last_logp, i, c, m),
                                  (which[rows] - start, cont[rows], cont_mask[rows]), batch_size)
    return out


def score_continuations(
    logits_fn: LogitsFn,
    prompt_ids_list: Sequence[Sequence[int]],
    continuation_ids_list: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int | None = None,
    length: int | None = None,
    kv_cache: bool = True,
) -> np.ndarray:
    """Summed log-probability of each continuation given its prompt: float32 [n].

    Only the continuation tokens count; an empty continuation scores 0.0
    (log 1). For a CausalLM (and `kv_cache`) each distinct prompt is read once
    and all its continuations (e.g. a candidate answer set) are scored from its
    cached keys and values. Otherwise each prompt + continuation is one
    left-padded row, scored in one forward pass; `length` fixes the padded row
    length there (one compile across calls). `batch_size` fixes the batch
    dimension (prompts and rows alike).
    """
    if len(prompt_ids_list) != len(continuation_ids_list):
        raise ValueError(f"{len(prompt_ids_list)} prompts but {len(continuation_ids_list)} continuations")
    for i, p in enumerate(prompt_ids_list):
        if len(p) == 0:
            raise UserInputError(f"prompt {i} is empty: the first continuation token needs a context")
    fn = as_pytree_fn(logits_fn)
    model = cached_model(fn) if kv_cache else None
    if model is not None:
        prompts = [tuple(int(t) for t in p) for p in prompt_ids_list]
        max_slots = model.cfg.max_len if model.cfg.flavour == "gpt2" else None
        return _score_shared_prompts(fn, prompts, continuation_ids_list, pad_id, batch_size, max_slots)
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids_list, continuation_ids_list)]
    ids, mask = left_pad(seqs, pad_id, length)
    target = np.zeros_like(mask)
    width = ids.shape[1]
    for i, c in enumerate(continuation_ids_list):
        if len(c):
            target[i, width - len(c):] = 1
    return run_in_chunks(lambda a, b, c: _score_jit(fn, a, b, c), (ids, mask, target), batch_size)
