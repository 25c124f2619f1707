"""Model mixing against frequency shock: combine a fine-tuned and a pre-trained LM.

docs/methods.md, "Frequency shock", model mixing. The published form is not available; two
standard forms are implemented, per decoding step and for ranking a
candidate answer set, with lambda (weight of the fine-tuned model) picked on a
dev split:

- "interpolate": p = lam * p_ft + (1 - lam) * p_pt, a mixture of the two
  distributions, computed in log space with logaddexp (no underflow);
- "log_linear":  p ∝ p_ft^lam * p_pt^(1 - lam), renormalised (a product of
  experts: a token needs support from both models).

The two models may read different prompts (the fine-tuned model zero-shot,
the pre-trained model few-shot): `greedy_decode_mixture` keeps one KV cache (or
buffer) per model and appends the same chosen token to both.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from clue_jax.errors import UserInputError
from clue_jax.eval import decode

MODES = ("interpolate", "log_linear")
DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:  # also refuses NaN
        raise UserInputError(f"mixing weight lambda must be in [0, 1], got {lam}")
    return lam


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserInputError(f"unknown mixing mode {mode!r}; expected one of {MODES}")
    return mode


def _scaled(weight: jax.Array, logp: jax.Array) -> jax.Array:
    """weight * logp with 0 * (-inf) = 0, so a weight of 0 removes a model exactly."""
    return jnp.where(weight == 0, 0.0, weight * logp)


@jax.jit
def interpolate(logp_ft: jax.Array, logp_pt: jax.Array, lam: float | jax.Array) -> jax.Array:
    """log(lam * p_ft + (1 - lam) * p_pt) from log-probabilities; exact at lam 0 and 1."""
    lam = jnp.asarray(lam, jnp.float32)
    return jnp.logaddexp(jnp.log(lam) + logp_ft, jnp.log1p(-lam) + logp_pt)


@functools.partial(jax.jit, static_argnames=("axis",))
def log_linear(logp_ft: jax.Array, logp_pt: jax.Array, lam: float | jax.Array, axis: int = -1) -> jax.Array:
    """log_softmax(lam * logp_ft + (1 - lam) * logp_pt) along `axis` (the vocabulary or candidates)."""
    lam = jnp.asarray(lam, jnp.float32)
    return jax.nn.log_softmax(_scaled(lam, logp_ft) + _scaled(1.0 - lam, logp_pt), axis=axis)


def _mix(mode: str, logp_ft: jax.Array, logp_pt: jax.Array, lam: jax.Array) -> jax.Array:
    return interpolate(logp_ft, logp_pt, lam) if mode == "interpolate" else log_linear(logp_ft, logp_pt, lam)


def _mixed_interpolate(fn_ft, fn_pt, lam, input_ids, attention_mask):
    lp_ft = jax.nn.log_softmax(fn_ft(input_ids, attention_mask).astype(jnp.float32), axis=-1)
    lp_pt = jax.nn.log_softmax(fn_pt(input_ids, attention_mask).astype(jnp.float32), axis=-1)
    return interpolate(lp_ft, lp_pt, lam)


def _mixed_log_linear(fn_ft, fn_pt, lam, input_ids, attention_mask):
    lp_ft = jax.nn.log_softmax(fn_ft(input_ids, attention_mask).astype(jnp.float32), axis=-1)
    lp_pt = jax.nn.log_softmax(fn_pt(input_ids, attention_mask).astype(jnp.float32), axis=-1)
    return log_linear(lp_ft, lp_pt, lam)


_MIXED_FNS = {"interpolate": _mixed_interpolate, "log_linear": _mixed_log_linear}


def mixed_logits_fn(
    logits_fn_ft: decode.LogitsFn, logits_fn_pt: decode.LogitsFn, lam: float, mode: str = "interpolate"
) -> Partial:
    """A logits function returning the mixed log-probabilities, for when both models read the same input.

    Usable wherever a logits function is (greedy_decode, score_continuations).
    lambda is a traced argument, so a lambda sweep compiles once.
    """
    lam = _check_lam(lam)
    return Partial(
        _MIXED_FNS[_check_mode(mode)],
        decode.as_pytree_fn(logits_fn_ft),
        decode.as_pytree_fn(logits_fn_pt),
        jnp.float32(lam),
    )


@functools.partial(jax.jit, static_argnames=("mode", "max_new_tokens", "stop_ids", "fill_id", "kv_cache"))
def _mixture_jit(fn_ft, fn_pt, ids_ft, mask_ft, ids_pt, mask_pt, lam, *, mode, max_new_tokens, stop_ids, fill_id,
                 kv_cache):
    def combine(logits):
        lp_ft, lp_pt = (jax.nn.log_softmax(lg, axis=-1) for lg in logits)
        return _mix(mode, lp_ft, lp_pt, lam)

    decoders = tuple(decode.make_decoder(fn, max_new_tokens, kv_cache) for fn in (fn_ft, fn_pt))
    prompts = ((ids_ft, mask_ft), (ids_pt, mask_pt))
    return decode.greedy_loop(decoders, prompts, combine, max_new_tokens, stop_ids, fill_id)


def greedy_decode_mixture(
    logits_fn_ft: decode.LogitsFn,
    logits_fn_pt: decode.LogitsFn,
    prompt_ft: np.ndarray,
    mask_ft: np.ndarray,
    prompt_pt: np.ndarray,
    mask_pt: np.ndarray,
    lam: float,
    mode: str = "interpolate",
    max_new_tokens: int = 10,
    eos_id: int | None = None,
    stop_ids: Sequence[int] = (),
    batch_size: int | None = None,
    fill_id: int = decode.FILL_ID,
    kv_cache: bool = True,
) -> np.ndarray:
    """Greedy decoding from the mixed next-token distribution of two models: int32 [B, N].

    Row b of `prompt_ft` and of `prompt_pt` are two prompts for the same
    question (each left-padded, lengths may differ). Each step mixes the two
    next-token log-probabilities and appends the argmax to both buffers.
    Output conventions are those of `decode.greedy_decode`; lambda is traced
    (one compile for a whole lambda sweep). Each CausalLM keeps its own KV
    cache of its own prompt (unless `kv_cache=False`).
    """
    lam = _check_lam(lam)
    mode = _check_mode(mode)
    ids_ft, m_ft = decode.check_prompts(prompt_ft, mask_ft, "prompt_ft")
    ids_pt, m_pt = decode.check_prompts(prompt_pt, mask_pt, "prompt_pt")
    if ids_ft.shape[0] != ids_pt.shape[0]:
        raise ValueError(f"prompt_ft has {ids_ft.shape[0]} rows but prompt_pt has {ids_pt.shape[0]}")
    fn_ft, fn_pt = decode.as_pytree_fn(logits_fn_ft), decode.as_pytree_fn(logits_fn_pt)
    stops = decode.stop_set(eos_id, stop_ids)
    lam_arr = jnp.float32(lam)

    def run(a, b, c, d):
        return _mixture_jit(
            fn_ft, fn_pt, a, b, c, d, lam_arr,
            mode=mode, max_new_tokens=int(max_new_tokens), stop_ids=stops, fill_id=int(fill_id),
            kv_cache=bool(kv_cache),
        )

    return decode.run_in_chunks(run, (ids_ft, m_ft, ids_pt, m_pt), batch_size)


def mix_candidate_scores(
    logp_ft: np.ndarray | jax.Array,
    logp_pt: np.ndarray | jax.Array,
    lam: float,
    mode: str = "interpolate",
    normalize: bool = True,
) -> np.ndarray:
    """Mixed log-probabilities over a candidate answer set, last axis = candidates.

    Inputs are per-candidate sequence log-probs (`score_continuations`), shape
    [..., C]. With `normalize` (default) each model's scores are first turned
    into a distribution over the candidate set (log_softmax), so both models
    vote with equal total mass; "interpolate" then mixes those distributions
    and "log_linear" renormalises the weighted product. Without it,
    "interpolate" mixes the raw sequence probabilities (the model giving the
    set more mass dominates). Rank candidates by argmax over the last axis.
    """
    lam = _check_lam(lam)
    mode = _check_mode(mode)
    ft = jnp.asarray(logp_ft, jnp.float32)
    pt = jnp.asarray(logp_pt, jnp.float32)
    if ft.shape != pt.shape:
        raise ValueError(f"candidate score shapes differ: {ft.shape} vs {pt.shape}")
    if normalize:
        ft, pt = jax.nn.log_softmax(ft, axis=-1), jax.nn.log_softmax(pt, axis=-1)
    return np.asarray(_mix(mode, ft, pt, jnp.float32(lam)))


def choose_lambda(
    dev_score_fn: Callable[[float], float], grid: Sequence[float] = DEFAULT_GRID
) -> tuple[float, dict[float, float]]:
    """The lambda in `grid` with the highest dev score (higher is better), and all scores.

    Ties go to the first lambda in grid order (by default the smallest, i.e.
    the one leaning most on the pre-trained model). A NaN score is refused.
    """
    if len(grid) == 0:
        raise UserInputError("lambda grid is empty")
    scores: dict[float, float] = {}
    for lam in grid:
        lam = _check_lam(lam)
        score = float(dev_score_fn(lam))
        if math.isnan(score):
            raise UserInputError(f"dev score for lambda={lam} is NaN")
        scores[lam] = score
    best = max(scores, key=lambda k: scores[k])  # max keeps the first of equal keys
    return best, scores
