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
    assert plan.implementation == "cudnn" and plan.compute_dtype is None
    assert plan.kwargs == dict(implementation="cudnn", is_causal=True, local_window_size=(31, 0), scale=SHAPE["scale"])
    assert _plan("gpu").kwargs["local_window_size"] is None  # global layer
    assert _plan("gpu", sliding_window=4096).kwargs["local_window_size"] is None  # window longer than T
    # float32 models (GPT-2's checkpoints): cuDNN in bfloat16, the precision it supports
    f32 = _plan("gpu", dtype=jnp.float32)
    assert (f32.implementation, f32.compute_dtype) == ("cudnn", "bfloat16")
    # cuDNN has no logit soft-capping (Gemma-2) and no head size over 128 here: the chunked path, no T x T mask
    for plan in (_plan("gpu", softcap=50.0), _plan("gpu", head_dim=256)):
        assert plan.implementation == "chunked" and plan.kwargs["block"] == attn.CHUNK


def test_plan_tpu_is_splash_with_softcap_and_mesh_axes():
    plan = _plan("tpu", softcap=50.0, sliding_window=32, seq_len=1024)
    assert plan.implementation == "splash"
    assert plan.kwargs == dict(scale=SHAPE["scale"], softcap=50.0, window=(31, 0), block=512)
    mesh = mesh_lib.make_mesh((2, 2, 2), jax.devices()[:8])
    assert _plan("tpu", mesh=mesh).mesh_axes == (("data", "fsdp"), "tensor")
    # kv heads that do not divide tensor are repeated until they do: heads stay sharded, never replicated
    one_kv = _plan("tpu", mesh=mesh, num_kv_heads=1)
    assert (one_kv.mesh_axes, one_kv.kv_repeat) == ((("data", "fsdp"), "tensor"), 2)
    # no kernel when the sequence is not a multiple of 128, the head size is not one of 128 lanes, or
    # several devices hold a batch that does not split over the data axes (a Pallas call cannot be auto-partitioned)
    assert _plan("tpu", seq_len=100).implementation == "dense"
    assert _plan("tpu", head_dim=64).implementation == "dense"
    assert _plan("tpu", mesh=mesh, batch=2, devices=8).implementation == "dense"
    assert _plan("tpu", devices=8).implementation == "dense"  # several devices, no context mesh
    assert _plan("tpu", devices=1).implementation == "splash"


@pytest.mark.parametrize("heads,kv,tensor,repeat", [
    (8, 4, 8, 2),  # Gemma-2 2B on tensor = 8
    (32, 8, 16, 2), (64, 8, 16, 2),  # LLaMA-3 8B / 70B on tensor = 16
    (16, 8, 8, 1), (4, 2, 1, 1), (12, 1, 4, 4)])
def test_kv_repeat_makes_kv_heads_divide_tensor(heads, kv, tensor, repeat):
    assert attn.kv_repeat_for(heads, kv, tensor) == repeat
    assert (kv * repeat) % tensor == 0 and (heads // kv) % repeat == 0


def test_query_heads_that_do_not_divide_tensor_are_refused_naming_a_size_that_works():
    with pytest.raises(attn.UserInputError) as err:
        attn.kv_repeat_for(8, 4, 16, " (mesh data=1, fsdp=1, tensor=16)")
    assert str(err.value).splitlines() == [
        "8 attention heads do not divide over the mesh's tensor axis of 16 (mesh data=1, fsdp=1, tensor=16): use a "
        "tensor size that divides 8 (e.g. 8, with the other 2x on fsdp)"]


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
    plan = _plan("gpu", seq_len=32, head_dim=16, scale=scale, sliding_window=window, dtype=jnp.float32)
    # same arguments with implementation="xla", on a CPU; float32 inside (the bfloat16 cast is tested below)
    plan = dataclasses.replace(plan, kwargs={**plan.kwargs, "implementation": "xla"}, compute_dtype=None)
    run = lambda q, k, v: attn.causal_attention(q, k, v, mask, scale=scale, sliding_window=window, plan=plan)
    ref = _reference(q, k, v, mask, scale, 0.0, window)
    _close_on_real(jax.jit(run)(q, k, v), ref, mask, 1e-5)
    # gradients through the padded rows stay finite (the loss masks them, NaN * 0 would not)
    grads = jax.grad(lambda q: jnp.sum(run(q, k, v) * mask[:, :, None, None]))(q)
    assert np.isfinite(np.asarray(grads)).all()
    # float32 inputs computed in bfloat16: a float32 output, close to the reference, not equal to it
    bf16 = attn.causal_attention(q, k, v, mask, scale=scale, sliding_window=window,
                                 plan=dataclasses.replace(plan, compute_dtype="bfloat16"))
    assert bf16.dtype == jnp.float32
    diff = np.abs(np.asarray(bf16) - np.asarray(ref))[np.asarray(mask, bool)].max()
    assert 0 < diff < 0.05


def test_right_padded_rows_skip_the_rotation():
    """Inside the trainer's step (right padding) the lengths path gathers nothing; elsewhere it rotates rows."""
    q, k, v, mask = _inputs(t=32, h=16)
    right = jnp.asarray(np.where(np.arange(32) < np.array([[24], [20]]), 1, 0), jnp.int32)
    plan = dataclasses.replace(_plan("gpu", seq_len=32, head_dim=16, scale=0.25, dtype=jnp.float32),
                               compute_dtype=None)
    plan = dataclasses.replace(plan, kwargs={**plan.kwargs, "implementation": "xla"})
    run = lambda q, k, v, m: attn.causal_attention(q, k, v, m, scale=0.25, plan=plan)
    gathers = lambda fn: str(jax.make_jaxpr(fn)(q, k, v, right)).count("gather")
    assert gathers(run) > 0 and gathers(attn.right_padded_rows(run)) == 0
    _close_on_real(jax.jit(attn.right_padded_rows(run))(q, k, v, right), _reference(q, k, v, right, 0.25, 0.0, 0),
                   right, 1e-5)


@pytest.mark.parametrize("t,block,softcap,window", [(37, 8, 20.0, 0), (48, 16, 20.0, 11)])
def test_chunked_path_matches_reference_and_its_gradient(t, block, softcap, window):
    q, k, v, mask = _inputs(t=t, h=8)
    run = lambda q, k, v: attn.chunked_attention(q, k, v, mask, scale=0.3, softcap=softcap, sliding_window=window,
                                                 block=block)
    ref = lambda q, k, v: _reference(q, k, v, mask, 0.3, softcap, window)
    _close_on_real(jax.jit(run)(q, k, v), ref(q, k, v), mask, 2e-5)
    real = mask[:, :, None, None]
    grads = jax.grad(lambda *x: jnp.sum(run(*x) * real), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(lambda *x: jnp.sum(ref(*x) * real), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)


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
    """The whole model with the GPU plan (cuDNN's arguments: is_causal, windows, sequence lengths; Gemma-2's
    soft-cap: the chunked path) gives the dense path's logits on real tokens, right- and left-padded."""
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
    def on_a_cpu(plan):  # cuDNN's arguments run with implementation="xla" (float32 inside)
        if plan.implementation != "cudnn":
            return plan
        return dataclasses.replace(plan, kwargs={**plan.kwargs, "implementation": "xla"}, compute_dtype=None)

    monkeypatch.setattr(attn, "backend", lambda: "gpu")
    monkeypatch.setattr(attn, "plan_attention", lambda *a, **k: chosen.append(planner(*a, **k)) or on_a_cpu(chosen[-1]))
    fused = model(ids, mask)
    assert {p.implementation for p in chosen} == ({"chunked"} if flavour == "gemma2" else {"cudnn"})
    _close_on_real(fused, dense, mask, 1e-4)


# ----------------------------------------------------------------- the shipped pod/cluster configs


def _shipped_models(config_file):
    import importlib.util
    import os

    from clue_jax.models.config import ModelConfig

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", config_file)
    spec = importlib.util.spec_from_file_location(f"cfg_{config_file[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    return c, {size: ModelConfig.from_dict(c.models[size].to_dict()) for size in ("small", "large")}


def _plan_model(backend, m, c, mesh=None, seq_len=2048):
    return attn.plan_attention(backend, batch=c.cpt.batch_size, seq_len=seq_len, num_heads=m.num_heads,
                               num_kv_heads=m.kv_heads, head_dim=m.head_size, dtype=m.compute_dtype,
                               scale=m.head_size**-0.5, softcap=m.attn_logit_softcap,
                               sliding_window=m.sliding_window, mesh=mesh, devices=1 if mesh is None else 2)


@pytest.mark.parametrize("config_file,backend,paths", [
    ("gpt2_gpu.py", "gpu", {"cudnn"}), ("llama3_pod.py", "gpu", {"cudnn"}), ("gemma2_pod.py", "gpu", {"chunked"}),
    ("llama3_pod.py", "tpu", {"splash"}), ("gemma2_pod.py", "tpu", {"splash"})])
def test_every_shipped_config_takes_a_fused_path(config_file, backend, paths):
    """No shipped model falls back to the dense [B, 1, T, T] mask on its accelerator; float32 (GPT-2) runs
    cuDNN in bfloat16; on the pod meshes every head is sharded over tensor (kv heads repeated where needed)."""
    c, models = _shipped_models(config_file)
    tensors = (4, 8, 16) if backend == "tpu" else (None,)
    for m in models.values():
        for tensor in tensors:
            mesh = None if tensor is None else jax.sharding.AbstractMesh((1, 8, tensor), ("data", "fsdp", "tensor"))
            if tensor and m.num_heads % tensor:  # Gemma-2 2B (8 heads) on tensor = 16: refused, naming tensor = 8
                with pytest.raises(attn.UserInputError, match=r"8 attention heads .* \(e\.g\. 8, with the other 2x"):
                    _plan_model(backend, m, c, mesh)
                continue
            plan = _plan_model(backend, m, c, mesh)
            assert plan.implementation in paths
            if plan.implementation == "cudnn":
                assert plan.compute_dtype == (None if m.compute_dtype != jnp.float32 else "bfloat16")
            if tensor:
                assert plan.mesh_axes == (("data", "fsdp"), "tensor")
                assert (m.kv_heads * plan.kv_repeat) % tensor == 0
