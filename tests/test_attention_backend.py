"""Fused attention per backend: the choice (backend injected), and each fused path against the reference.

The cuDNN path's arguments (is_causal, local_window_size, sequence lengths) are
run here with implementation="xla", which takes the same arguments; the TPU
splash kernel runs in Pallas interpret mode on the CPU.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clue_jax.models import attention as attn
from clue_jax.parallel import mesh as mesh_lib

SHAPE = dict(batch=4, seq_len=128, num_heads=4, num_kv_heads=2, head_dim=128, scale=128**-0.5)


def _plan(backend, dtype=jnp.bfloat16, softcap=0.0, sliding_window=0, mesh=None, **over):
    return attn.plan_attention(backend, **{**SHAPE, **over}, dtype=dtype, softcap=softcap,
                               sliding_window=sliding_window, mesh=mesh)


def test_plan_cpu_is_the_dense_xla_path():
    assert _plan("cpu").implementation == "dense"
    assert _plan("cpu", softcap=50.0).kwargs["softcap"] == 50.0


def test_plan_gpu_is_cudnn_with_lengths_and_no_mask():
    plan = _plan("gpu", sliding_window=32)
    assert plan.implementation == "cudnn"
    assert plan.kwargs == dict(implementation="cudnn", is_causal=True, local_window_size=(31, 0), scale=SHAPE["scale"])
    assert _plan("gpu").kwargs["local_window_size"] is None  # global layer
    assert _plan("gpu", sliding_window=4096).kwargs["local_window_size"] is None  # window longer than T
    # float32 or an unsupported head size: same arguments, XLA instead of cuDNN
    assert _plan("gpu", dtype=jnp.float32).kwargs["implementation"] == "xla"
    assert _plan("gpu", head_dim=160).implementation == "xla"
    # cuDNN has no logit soft-capping: Gemma-2 takes the einsum path on a GPU
    assert _plan("gpu", softcap=50.0).implementation == "dense"


def test_plan_tpu_is_splash_with_softcap_and_mesh_axes():
    plan = _plan("tpu", softcap=50.0, sliding_window=32, seq_len=1024)
    assert plan.implementation == "splash"
    assert plan.kwargs == dict(scale=SHAPE["scale"], softcap=50.0, window=(31, 0), block=512)
    mesh = mesh_lib.make_mesh((2, 2, 2), jax.devices()[:8])
    assert _plan("tpu", mesh=mesh).mesh_axes == (("data", "fsdp"), "tensor")
    assert _plan("tpu", mesh=mesh, num_kv_heads=1).mesh_axes == (("data", "fsdp"), None)
    # no kernel when the sequence is not a multiple of 128, the head size is not one of 128 lanes, or
    # several devices hold a batch that does not split over the data axes (a Pallas call cannot be auto-partitioned)
    assert _plan("tpu", seq_len=100).implementation == "dense"
    assert _plan("tpu", head_dim=64).implementation == "dense"
    assert _plan("tpu", mesh=mesh, batch=2, devices=8).implementation == "dense"
    assert _plan("tpu", devices=8).implementation == "dense"  # several devices, no context mesh
    assert _plan("tpu", devices=1).implementation == "splash"


def _inputs(t=128, n=4, kv=2, h=128, b=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32)
    k = jax.random.normal(keys[1], (b, t, kv, h), jnp.float32)
    v = jax.random.normal(keys[2], (b, t, kv, h), jnp.float32)
    mask = np.ones((b, t), np.int32)
    mask[0, t - t // 4:] = 0  # right padding (training batches)
    mask[1, :t // 3] = 0  # left padding (decoding prompts)
    return q, k, v, jnp.asarray(mask)


def _reference(q, k, v, mask, scale, softcap, window):
    return attn.attend(q, k, v, attn.allowed_keys(mask, window), scale=scale, softcap=softcap, fast=False)


def _close_on_real(out, ref, mask, atol):
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("window", [0, 16])
def test_sequence_length_path_matches_reference(window):
    q, k, v, mask = _inputs(t=32, h=16)
    scale = 16**-0.5
    plan = _plan("gpu", seq_len=32, head_dim=16, scale=scale, sliding_window=window)
    plan = dataclasses.replace(plan, kwargs={**plan.kwargs, "implementation": "xla"})  # same arguments, on a CPU
    run = lambda q, k, v: attn.causal_attention(q, k, v, mask, scale=scale, sliding_window=window, plan=plan)
    _close_on_real(jax.jit(run)(q, k, v), _reference(q, k, v, mask, scale, 0.0, window), mask, 1e-5)
    # gradients through the padded rows stay finite (the loss masks them, NaN * 0 would not)
    grads = jax.grad(lambda q: jnp.sum(run(q, k, v) * mask[:, :, None, None]))(q)
    assert np.isfinite(np.asarray(grads)).all()


@pytest.mark.parametrize("softcap,window", [(0.0, 0), (0.0, 48), (20.0, 0)])
def test_splash_kernel_interpreted_matches_reference(softcap, window):
    q, k, v, mask = _inputs()
    scale = 128**-0.5
    plan = dataclasses.replace(_plan("tpu", softcap=softcap, sliding_window=window, scale=scale), interpret=True)
    assert plan.implementation == "splash"
    out = attn.causal_attention(q, k, v, mask, scale=scale, softcap=softcap, sliding_window=window, plan=plan)
    _close_on_real(out, _reference(q, k, v, mask, scale, softcap, window), mask, 2e-5)


def test_splash_under_shard_map_matches_reference():
    q, k, v, mask = _inputs(b=4)
    mesh = mesh_lib.make_mesh((2, 1, 2), jax.devices()[:4])
    scale = 128**-0.5
    with jax.set_mesh(mesh):
        plan = dataclasses.replace(_plan("tpu", scale=scale, mesh=jax.sharding.get_abstract_mesh()), interpret=True)
        assert plan.mesh_axes == (("data", "fsdp"), "tensor")
        out = jax.jit(lambda q, k, v, m: attn.causal_attention(q, k, v, m, scale=scale, plan=plan))(q, k, v, mask)
    _close_on_real(out, _reference(q, k, v, mask, scale, 0.0, 0), mask, 2e-5)


# ----------------------------------------------------------------- scoring skips hidden key blocks


def _dense_scores(q, k, v, mask, scale, softcap, window, query_index):
    allowed = attn.allowed_keys(mask, window)
    logits = jnp.where(allowed[:, :, None], attn._logits(q, k, scale, softcap), attn._MASKED)
    probs = jax.nn.softmax(logits, axis=-1)  # [B, K, G, T, T]
    colsum = jnp.einsum("bkgqs,bq->bs", probs, mask.astype(jnp.float32))
    row = jnp.einsum("bkgqs,bq->bs", probs, jax.nn.one_hot(query_index, q.shape[1]))
    return attn._weighted_values(probs, v, q.dtype), colsum, row


@pytest.mark.parametrize("t,block,softcap,window", [
    (40, 8, 0.0, 0), (37, 8, 20.0, 0), (40, 8, 0.0, 11), (64, 16, 0.0, 16), (24, 32, 0.0, 0), (56, 8, 0.0, 100)])
def test_scoring_matches_dense_reference(t, block, softcap, window):
    q, k, v, mask = _inputs(t=t, h=8)
    query_index = jnp.asarray([t // 2, t - 1])  # real queries of each row
    request = attn.ScoreRequest(query_block=block, query_index=query_index)
    out, colsum, row = jax.jit(lambda q, k, v, m: attn.attend_and_score(
        q, k, v, m, scale=0.3, softcap=softcap, sliding_window=window, request=request))(q, k, v, mask)
    ref_out, ref_colsum, ref_row = _dense_scores(q, k, v, mask, 0.3, softcap, window, query_index)
    np.testing.assert_allclose(colsum, ref_colsum, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(row, ref_row, atol=2e-6, rtol=1e-5)
    _close_on_real(out, ref_out, mask, 2e-5)


def test_schedule_visits_only_visible_key_blocks():
    for n in (1, 2, 5, 8):
        slot_q, slot_live, pair_slot, pair_kb, live = attn.score_schedule(n, 16, 0)
        seen = {(int(slot_q[s, pair_slot[s, p]]), int(pair_kb[s, p])) for s, p in zip(*np.nonzero(live))}
        assert seen == {(i, j) for i in range(n) for j in range(i + 1)}  # the causal triangle, each block once
        assert live.sum() == n * (n + 1) // 2 and sorted(slot_q[slot_live]) == list(range(n))
    # a window of 32 with blocks of 16 reaches 3 key blocks per query block
    _, _, _, pair_kb, live = attn.score_schedule(16, 16, 32)
    assert live.shape[1] == 3 and live.sum() == 16 * 3 - 1 - 2


@pytest.mark.parametrize("flavour", ["llama", "gemma2"])
def test_model_planned_for_a_gpu_gives_the_cpu_logits(monkeypatch, flavour):
    """The whole model with the GPU plan (float32: XLA with is_causal, windows, sequence lengths; Gemma-2's
    soft-cap: the einsum path) gives the dense path's logits on real tokens, right- and left-padded."""
    from flax import nnx

    from clue_jax.models import config as model_config
    from clue_jax.models.causal_lm import CausalLM

    make = getattr(model_config, flavour)
    cfg = make(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, head_dim=8,
               sliding_window=5, attn_logit_softcap=50.0 if flavour == "gemma2" else 0.0)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    _, _, _, mask = _inputs(t=16)
    dense = model(ids, mask)
    chosen = []
    planner = attn.plan_attention
    monkeypatch.setattr(attn, "backend", lambda: "gpu")
    monkeypatch.setattr(attn, "plan_attention", lambda *a, **k: chosen.append(planner(*a, **k)) or chosen[-1])
    fused = model(ids, mask)
    assert {p.implementation for p in chosen} == ({"dense"} if flavour == "gemma2" else {"xla"})
    _close_on_real(fused, dense, mask, 1e-4)
