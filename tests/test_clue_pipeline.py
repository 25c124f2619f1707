"""Clue dropout in training: live scoring equals cached scoring, and a resumed run replays the same dropout."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from clue_jax.clues import dropout, scoring
from clue_jax.data.batching import ArrayBatchSource
from clue_jax.errors import UserInputError
from clue_jax.models import config as model_config
from clue_jax.models.causal_lm import CausalLM
from clue_jax.pipelines.continual import live_transform
from clue_jax.parallel import mesh as mesh_lib
from clue_jax.train import defaults, loop, objectives

SMALL = model_config.llama(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64)
LARGE = model_config.llama(vocab_size=64, d_model=48, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=96)


def _docs(n=16, t=20, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, t + 1, size=n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(3, 64, size=(n, t)), 2).astype(np.int32)
    ids[:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_live_scores_equal_cached_scores():
    teachers = {"large": CausalLM(LARGE, rngs=nnx.Rngs(1)), "small": CausalLM(SMALL, rngs=nnx.Rngs(2))}
    docs = _docs()
    cached = {s: scoring.score_corpus(scoring.make_scorer(m, query_block=8), docs["input_ids"],
                                      docs["attention_mask"], batch_size=8) for s, m in teachers.items()}
    keep_all = dropout.DropoutConfig(method="contrast", original_fraction=1.0, pad_id=2)
    transform, states = live_transform(teachers, keep_all, query_block=8)
    out = jax.jit(transform)(jax.random.key(0), {k: np.asarray(v) for k, v in docs.items()}, states)
    np.testing.assert_allclose(out["scores_large"], cached["large"], atol=1e-6)
    np.testing.assert_allclose(out["scores_small"], cached["small"], atol=1e-6)
    np.testing.assert_array_equal(out["input_ids"], docs["input_ids"])


def test_live_scores_use_the_teacher_dtype_like_cached_scores():
    teachers = {"large": CausalLM(LARGE, rngs=nnx.Rngs(1)), "small": CausalLM(SMALL, rngs=nnx.Rngs(2))}
    docs = _docs()
    keep_all = dropout.DropoutConfig(method="contrast", original_fraction=1.0, pad_id=2)
    outs = {}
    for dtype in (None, "bfloat16"):
        transform, states = live_transform(teachers, keep_all, query_block=8, teacher_dtype=dtype)
        outs[dtype] = jax.jit(transform)(jax.random.key(0), {k: np.asarray(v) for k, v in docs.items()}, states)
    bf16 = scoring.score_corpus(scoring.make_scorer(teachers["large"], dtype="bfloat16", query_block=8),
                                docs["input_ids"], docs["attention_mask"], batch_size=8)
    np.testing.assert_allclose(outs["bfloat16"]["scores_large"], bf16, atol=1e-6)
    assert not np.allclose(outs["bfloat16"]["scores_large"], outs[None]["scores_large"], atol=1e-6)


def test_non_finite_scores_are_refused_naming_the_stage():
    scores = np.ones((3, 4), np.float32)
    assert scoring.check_finite(scores, "scores_test") is scores
    scores[1, 2] = np.nan
    with pytest.raises(UserInputError, match=r"scores_test.*1 of 12 .*not finite.*documents \[1\]"):
        scoring.check_finite(scores, "scores_test")


def _run(workdir, steps, data):
    drop = dropout.DropoutConfig(method="contrast", alpha=0.7, beta=0.1, original_fraction=0.0,
                                 protected_ids=(1, 2), pad_id=2)
    tcfg = defaults.train_config(steps=steps, batch_size=8, lr=3e-3, schedule="constant", warmup_steps=0,
                                 log_every=1, checkpoint_every=3)
    trainer = loop.Trainer(CausalLM(SMALL, rngs=nnx.Rngs(0)), objectives.causal_lm, tcfg,
                           mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]), str(workdir),
                           transform=lambda rng, batch, extras: dropout.augment_batch(rng, batch, None, drop),
                           meta={"model": SMALL.to_dict()})
    result = trainer.run(ArrayBatchSource(data, batch_size=8, seed=0))
    losses = {}
    for line in open(workdir / "metrics.jsonl"):
        rec = json.loads(line)
        losses[rec["step"]] = rec["loss"]
    return jax.tree.map(np.asarray, nnx.state(result.model, nnx.Param)), losses


def test_resumed_run_replays_the_same_dropout(tmp_path):
    data = _docs()
    rng = np.random.default_rng(1)
    data["scores_large"] = rng.random(data["input_ids"].shape).astype(np.float32)
    data["scores_small"] = rng.random(data["input_ids"].shape).astype(np.float32)
    straight, losses_a = _run(tmp_path / "a", 6, data)
    _run(tmp_path / "b", 3, data)
    resumed, losses_b = _run(tmp_path / "b", 6, data)
    assert losses_a == losses_b
    for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(x, y)
