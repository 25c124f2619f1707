"""The sharded train step is FSDP: weights are gathered, activations stay split, and its state's dtypes hold.

The compiled programs are read through clue_jax.parallel.collectives (8 fake CPU devices, tests/conftest.py).
"""
import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clue_jax.data.batching import ArrayBatchSource
from clue_jax.models import config as model_config
from clue_jax.models.causal_lm import CausalLM
from clue_jax.parallel import collectives, mesh, rules
from clue_jax.train import defaults, loop, objectives

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))
from train_worker import tiny_data  # noqa: E402

B, T, D, MLP, V = 8, 40, 64, 96, 160  # distinct sizes (kv projections: 32), so a shape in the HLO names its tensor


def _trainer(tmp_path, devices, batch_size=B, micro=1, dtype="float32", **overrides):
    cfg = model_config.llama(vocab_size=V, d_model=D, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=MLP,
                             dtype=dtype, param_dtype=dtype)
    tcfg = defaults.train_config(**{**dict(steps=6, batch_size=batch_size, micro_batches=micro, seq_len=T, lr=3e-3,
                                           warmup_steps=1, log_every=1, checkpoint_every=100), **overrides})
    m = mesh.make_mesh((1, devices, 1), jax.devices()[:devices])
    return loop.Trainer(CausalLM(cfg, rngs=nnx.Rngs(0)), objectives.causal_lm, tcfg, m, str(tmp_path),
                        meta={"model": cfg.to_dict()})


def _compiled_collectives(trainer, batch_size):
    batch = {k: jnp.ones((batch_size, T), jnp.int32) for k in ("input_ids", "attention_mask")}
    batch = jax.device_put(batch, trainer.batch_sharding)
    text = trainer._step_fn.lower(trainer.state, batch, trainer.frozen, None).compile().as_text()
    return collectives.collectives(text)


def test_step_gathers_weights_and_keeps_activations_split(tmp_path):
    micro = 2  # each of the 8 devices computes its row of every micro-batch
    found = _compiled_collectives(_trainer(tmp_path, 8, batch_size=B * micro, micro=micro), B * micro)
    moved = [c for c in found if c["op"] in ("all-gather", "all-reduce") and T in c["shape"] and c["dtype"] != "s32"]
    assert not moved, f"activations (or logits) all-reduced or gathered: {moved}"
    whole = [c for c in found if c["shape"][:2] in ([B * micro, T], [B, T]) and c["dtype"] != "s32"]
    assert not whole, f"a whole (micro-)batch of activations communicated: {whole}"
    gathered = {tuple(c["shape"]) for c in found if c["op"] == "all-gather"}
    assert {(D, MLP), (MLP, D), (D, V)} <= gathered, gathered  # MLP weights and the LM head, all-gathered


def test_micro_batches_keep_each_devices_share():
    batch_size, micro = 16, 4
    m = mesh.make_mesh((1, 4, 1), jax.devices()[:4])
    ids = jax.device_put(jnp.arange(batch_size * T, dtype=jnp.int32).reshape(batch_size, T),
                         rules.batch_sharding(m))
    with rules.activation_mesh(m):
        split = jax.jit(lambda x: loop.split_micro({"x": x}, micro)["x"])(ids)
    assert split.shape == (micro, batch_size // micro, T)
    for shard in split.addressable_shards:  # [micro, 1, T]: one row of every micro-batch, from its own rows
        assert shard.data.shape == (micro, 1, T)
        before = next(s for s in ids.addressable_shards if s.device == shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data)[:, 0], np.asarray(before.data))


def test_bf16_full_finetune_preempted_resumes_exactly(tmp_path):
    class Preempting(ArrayBatchSource):
        def batch(self, step, rows=None):
            if step == 3 and self.signal:
                os.kill(os.getpid(), signal.SIGTERM)  # what a pod's preemption notice sends
            return super().batch(step, rows)

    def run(name, preempt):
        source = Preempting(tiny_data(t=T, vocab=V), batch_size=B, seed=0)
        source.signal = preempt
        return _trainer(tmp_path / name, 1, dtype="bfloat16").run(source)

    straight = run("straight", False)
    stopped = run("preempted", True)
    assert stopped.status == "preempted" and stopped.step == 4
    resumed = run("preempted", False)
    assert resumed.status == "done" and resumed.step == 6
    records = [json.loads(line) for line in open(tmp_path / "preempted" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # resumed at 5, not restarted at 1
    straight_losses = [json.loads(line)["loss"] for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert [r["loss"] for r in records] == straight_losses
    for a, b in zip(jax.tree.leaves(nnx.state(straight.model)), jax.tree.leaves(nnx.state(resumed.model))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def test_a_step_that_changes_the_state_dtype_is_refused(tmp_path):
    trainer = _trainer(tmp_path, 1, dtype="bfloat16")
    before = loop._dtypes(trainer.state)
    assert any(".mu[" in path and dtype == "bfloat16" for path, dtype in before)  # AdamW moments created in bf16
    trainer._check_no_drift(before)  # unchanged: accepted
    trainer.state = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, trainer.state)
    with pytest.raises(loop.StateDrift, match=r"turned state\[.*from bfloat16 into float32"):
        trainer._check_no_drift(before)
