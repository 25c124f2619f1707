"""KV-cached decoding and scoring equal the uncached buffer reruns, token for token, for every flavour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clue_jax.eval import decode
from clue_jax.extraction import mixing
from clue_jax.models import config, kv_cache, lora
from clue_jax.models.causal_lm import CausalLM

V = 61
SMALL = dict(vocab_size=V, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=40)
FLAVOURS = {
    "gpt2": config.gpt2(**SMALL),
    "llama": config.llama(**dict(SMALL, num_kv_heads=1, rope_scaling=(8.0, 1.0, 4.0, 16))),  # GQA 4:1
    # Sliding window 3 (layers 0 and 2) is far shorter than prompt + answer; both soft caps bite.
    "gemma2": config.gemma2(**dict(SMALL, num_layers=4, num_kv_heads=2, sliding_window=3, attn_logit_softcap=2.0,
                                   final_logit_softcap=4.0, query_pre_attn_scalar=16.0)),
}
PROMPTS = [[3], [1, 4, 1, 5, 9, 2, 6], [9, 2], [7, 7, 7, 8], [10, 0, 6, 2, 2, 13, 40, 33, 21, 5], [59]]


def peaky_model(cfg, seed=0, scale=8.0):
    """A random model with weights scaled up, so its logits have clear winners (no near-ties to flip)."""
    model = CausalLM(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p * scale if p.ndim == 2 else p, state))
    return model


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_cache_logits_equal_full_forward(flavour):
    model = peaky_model(FLAVOURS[flavour])
    # Every row ends with three more tokens, so the prefill's last column and the three steps are real tokens.
    ids, mask = decode.left_pad([p + [2, 30, 7] for p in PROMPTS], pad_id=0, length=14)
    full = np.asarray(model(ids, mask))
    cache, last = kv_cache.prefill(model, jnp.asarray(ids[:, :11]), jnp.asarray(mask[:, :11]), 14)
    np.testing.assert_allclose(last, full[:, 10], rtol=1e-4, atol=1e-4)
    for col in range(11, 14):
        cache, logits = kv_cache.step(model, cache, jnp.asarray(ids[:, col]))
        np.testing.assert_allclose(logits, full[:, col], rtol=1e-4, atol=1e-4)
    assert int(cache.length) == 14


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_cached_greedy_equals_uncached(flavour):
    model = peaky_model(FLAVOURS[flavour])
    ids, mask = decode.left_pad(PROMPTS, pad_id=0, length=16)
    fn = decode.model_logits_fn(model)
    kw = dict(max_new_tokens=12, batch_size=4, eos_id=5, stop_ids=(17,))
    cached = decode.greedy_decode(fn, ids, mask, **kw)
    uncached = decode.greedy_decode(fn, ids, mask, kv_cache=False, **kw)
    np.testing.assert_array_equal(cached, uncached)
    assert len(np.unique(cached)) > 3, "a degenerate decode would prove little"
    # Extra left padding changes nothing (positions come from the mask), cached or not.
    ids_w, mask_w = decode.left_pad(PROMPTS, pad_id=0, length=20)
    np.testing.assert_array_equal(decode.greedy_decode(model, ids_w, mask_w, **kw), cached)


def test_cached_decoding_sees_weight_updates_and_compiles_once():
    model = peaky_model(FLAVOURS["llama"])
    ids, mask = decode.left_pad(PROMPTS, pad_id=0, length=16)
    before = decode.greedy_decode(decode.model_logits_fn(model), ids, mask, max_new_tokens=6, batch_size=3)
    compiled = decode._greedy_jit._cache_size()
    nnx.update(model, nnx.state(peaky_model(FLAVOURS["llama"], seed=1)))
    after = decode.greedy_decode(decode.model_logits_fn(model), ids, mask, max_new_tokens=6, batch_size=3)
    assert decode._greedy_jit._cache_size() == compiled
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, decode.greedy_decode(model, ids, mask, max_new_tokens=6, kv_cache=False))


def test_lora_model_decodes_cached():
    model = peaky_model(FLAVOURS["llama"])
    lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(3))
    for path, p in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        p.set_value(jax.random.normal(jax.random.key(len(path)), p.shape))  # nonzero B: the adapters matter
    ids, mask = decode.left_pad(PROMPTS, pad_id=0)
    np.testing.assert_array_equal(decode.greedy_decode(model, ids, mask, max_new_tokens=8),
                                  decode.greedy_decode(model, ids, mask, max_new_tokens=8, kv_cache=False))


@pytest.mark.parametrize("flavour", ["gemma2"])  # the flavour with every feature; the others share the code path
def test_cached_mixture_equals_uncached(flavour):
    ft, pt = peaky_model(FLAVOURS[flavour], seed=0), peaky_model(FLAVOURS[flavour], seed=1)
    fn_ft, fn_pt = decode.model_logits_fn(ft), decode.model_logits_fn(pt)
    ids_ft, m_ft = decode.left_pad(PROMPTS, pad_id=0, length=12)
    ids_pt, m_pt = decode.left_pad([p[::-1] + [1, 2] for p in PROMPTS], pad_id=0, length=16)  # its own prompts
    kw = dict(max_new_tokens=10, batch_size=4)
    for lam, mode in ((0.5, "interpolate"), (0.3, "log_linear")):
        args = (fn_ft, fn_pt, ids_ft, m_ft, ids_pt, m_pt, lam, mode)
        cached = mixing.greedy_decode_mixture(*args, **kw)
        np.testing.assert_array_equal(cached, mixing.greedy_decode_mixture(*args, kv_cache=False, **kw))
    # The endpoints are the single models, each reading its own prompt through its own cache.
    np.testing.assert_array_equal(mixing.greedy_decode_mixture(fn_ft, fn_pt, ids_ft, m_ft, ids_pt, m_pt, 0.0, **kw),
                                  decode.greedy_decode(fn_pt, ids_pt, m_pt, **kw))
    np.testing.assert_array_equal(mixing.greedy_decode_mixture(fn_ft, fn_pt, ids_ft, m_ft, ids_pt, m_pt, 1.0, **kw),
                                  decode.greedy_decode(fn_ft, ids_ft, m_ft, **kw))


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_candidate_scores_reuse_the_prompt_and_equal_uncached(flavour, monkeypatch):
    prefilled = []
    real_prefill = decode._prefill_jit

    def counting_prefill(fn, ids, mask, *, slots):
        prefilled.append(ids.shape[0])
        return real_prefill(fn, ids, mask, slots=slots)

    monkeypatch.setattr(decode, "_prefill_jit", counting_prefill)
    model = peaky_model(FLAVOURS[flavour], scale=2.0)
    fn = decode.model_logits_fn(model)
    candidates = [[4], [8, 9], [11, 12, 13, 14, 15], []]
    prompts = [p for p in PROMPTS for _ in candidates]
    conts = [c for _ in PROMPTS for c in candidates]
    cached = decode.score_continuations(fn, prompts, conts, pad_id=0, batch_size=4)
    uncached = decode.score_continuations(fn, prompts, conts, pad_id=0, batch_size=4, kv_cache=False)
    np.testing.assert_allclose(cached, uncached, rtol=1e-4, atol=1e-4)
    assert np.all(cached[3::4] == 0.0) and np.all(cached[0::4] < 0)
    assert prefilled == [4, 4], "6 distinct prompts in chunks of 4: two prefills for all 24 rows"
