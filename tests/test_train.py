"""The training loop: loss falls, sharding and accumulation are exact, resume is exact, guards hold."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from clue_jax.data.batching import ArrayBatchSource
from clue_jax.errors import UserInputError
from clue_jax.models import config as model_config
from clue_jax.models.causal_lm import CausalLM
from clue_jax.parallel import mesh
from clue_jax.train import checkpoint, defaults, loop, objectives

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))
from train_worker import tiny_data  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "workers", "train_worker.py")


def _model(flavour="llama"):
    cfg = {
        "llama": model_config.llama(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64),
        "gpt2": model_config.gpt2(vocab_size=64, d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=16),
    }[flavour]
    return CausalLM(cfg, rngs=nnx.Rngs(0)), cfg


def _train(tmp_path, shape, steps=6, micro=1, name="run", source=None, **overrides):
    model, cfg = _model()
    settings = dict(steps=steps, batch_size=8, micro_batches=micro, lr=3e-3, warmup_steps=1, log_every=1,
                    checkpoint_every=100)
    tcfg = defaults.train_config(**{**settings, **overrides})
    n = int(np.prod(shape))
    m = mesh.make_mesh(shape, jax.devices()[:n])
    trainer = loop.Trainer(model, objectives.causal_lm, tcfg, m, str(tmp_path / name), meta={"model": cfg.to_dict()})
    result = trainer.run(source or ArrayBatchSource(tiny_data(), batch_size=8, seed=0))
    losses = [json.loads(l)["loss"] for l in open(tmp_path / name / "metrics.jsonl")]
    params = jax.tree.map(np.asarray, nnx.state(result.model, nnx.Param))
    return result, losses, params


def _assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-4)


def test_loss_falls(tmp_path):
    result, losses, _ = _train(tmp_path, (1, 1, 1), steps=40, lr=1e-2)
    assert result.status == "done" and result.step == 40
    assert losses[-1] < 0.5 * losses[0]


def test_sharded_step_equals_single_device(tmp_path):
    _, losses1, params1 = _train(tmp_path, (1, 1, 1), name="one")
    _, losses8, params8 = _train(tmp_path, (2, 2, 2), name="eight")
    np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
    _assert_trees_close(params1, params8, atol=1e-5)


def test_gradient_accumulation_equals_full_batch(tmp_path):
    _, losses1, params1 = _train(tmp_path, (1, 1, 1), name="full")
    _, losses2, params2 = _train(tmp_path, (1, 1, 1), micro=4, name="micro")
    np.testing.assert_allclose(losses1, losses2, rtol=1e-5)
    _assert_trees_close(params1, params2, atol=1e-5)


def _run_worker(workdir, steps, sleep=0.0):
    return subprocess.Popen([sys.executable, WORKER, str(workdir), str(steps), str(sleep)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(workdir, min_step, proc, timeout=120):
    ckpt = os.path.join(workdir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"worker ended early: {proc.stderr.read()[-2000:]}")
        steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
        if steps and max(steps) >= min_step:
            return
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def _losses_by_step(workdir):
    """Each step's loss; a resume logs the steps after its checkpoint again and drops the killed run's lines."""
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        rec = json.loads(line)
        assert rec["step"] not in out, f"step {rec['step']} logged twice"
        out[rec["step"]] = rec["loss"]
    return out


def test_kill_9_then_resume_is_exact(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    a = _run_worker(straight, 12)
    b = _run_worker(killed, 12, sleep=0.3)
    _wait_for_checkpoint(killed, 4, b)
    b.send_signal(signal.SIGKILL)
    b.wait()
    assert not os.path.exists(killed / "final_params.npz")
    c = _run_worker(killed, 12)
    for proc in (a, c):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    p1, p2 = np.load(straight / "final_params.npz"), np.load(killed / "final_params.npz")
    for key in p1.files:
        np.testing.assert_array_equal(p1[key], p2[key])
    assert _losses_by_step(straight) == _losses_by_step(killed)


def test_sigterm_saves_and_exits_zero(tmp_path):
    proc = _run_worker(tmp_path, 1000, sleep=0.2)
    _wait_for_checkpoint(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "status=preempted" in out
    step = int(out.split("step=")[1].split()[0])
    assert step in [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]



@pytest.mark.parametrize("log_every,checkpoint_every,kept", [(1, 2, 4), (5, 4, 4), (1, 100, None)])
def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, log_every, checkpoint_every, kept):
    """(5, 4): the NaN at step 6 lies between log boundaries and is still found before step 8 is saved;
    (1, 100): nothing was saved before it, and the message says so."""
    model, cfg = _model()
    tcfg = defaults.train_config(steps=10, batch_size=8, lr=3e-3, warmup_steps=1, log_every=log_every,
                                 checkpoint_every=checkpoint_every)
    data = tiny_data()
    data["poison"] = np.zeros((64, 16), np.float32)

    class Source(ArrayBatchSource):
        def batch(self, step, rows=None):
            b = super().batch(step, rows)
            if step >= 5:
                b["poison"] = np.full_like(b["poison"], np.nan)
            return b

    def objective(model, batch, rng):
        loss, aux = objectives.causal_lm(model, batch, rng)
        return loss + batch["poison"].sum(), aux

    m = mesh.make_mesh((1, 1, 1), jax.devices()[:1])
    trainer = loop.Trainer(model, objective, tcfg, m, str(tmp_path), meta={"model": cfg.to_dict()})
    said = "the last good checkpoint in .* is kept" if kept else "no checkpoint had been saved yet"
    with pytest.raises(loop.NonFiniteLoss, match=f"at step 6; stopped, {said}$"):
        trainer.run(Source(data, batch_size=8))
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert max(saved, default=None) == kept


def test_metrics_leave_the_device_only_at_log_and_save_boundaries(tmp_path, monkeypatch):
    fetched = []
    log = loop.Trainer._log

    def spy(self, pending, *args):
        fetched.append([step for step, _ in pending])
        return log(self, pending, *args)

    monkeypatch.setattr(loop.Trainer, "_log", spy)
    _, losses, _ = _train(tmp_path, (1, 1, 1), steps=10, log_every=4, checkpoint_every=6)
    assert fetched == [[1, 2, 3, 4], [5, 6], [7, 8], [9, 10]]
    assert len(losses) == 3  # records at steps 4, 8 and the last


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    _train(tmp_path, (1, 1, 1), steps=4, name="w", checkpoint_every=2, keep_checkpoints=3)
    ckpt = tmp_path / "w" / "checkpoints"
    for root, _, files in os.walk(ckpt / "4"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    model, cfg = _model()
    tcfg = defaults.train_config(steps=4, batch_size=8, checkpoint_every=2)
    trainer = loop.Trainer(model, objectives.causal_lm, tcfg, mesh.make_mesh((1, 1, 1), jax.devices()[:1]),
                           str(tmp_path / "w"), meta={"model": cfg.to_dict()})
    assert trainer.restore(checkpoint.Checkpointer(str(ckpt))) == 2


def test_incompatible_checkpoint_is_refused(tmp_path):
    _train(tmp_path, (1, 1, 1), steps=2, name="w")
    model, cfg = _model("gpt2")
    tcfg = defaults.train_config(steps=4, batch_size=8)
    trainer = loop.Trainer(model, objectives.causal_lm, tcfg, mesh.make_mesh((1, 1, 1), jax.devices()[:1]),
                           str(tmp_path / "w"), meta={"model": cfg.to_dict()})
    before = sorted(os.listdir(tmp_path / "w" / "checkpoints"))
    with pytest.raises(UserInputError, match="another model config"):
        trainer.run(ArrayBatchSource(tiny_data(), batch_size=8))
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == before


def test_batch_not_divisible_by_mesh_is_an_error():
    model, cfg = _model()
    with pytest.raises(UserInputError, match="divisible"):
        loop.Trainer(model, objectives.causal_lm, defaults.train_config(batch_size=6),
                     mesh.make_mesh((4, 1, 2), jax.devices()), "/tmp/unused")


def test_causal_lm_objective_matches_next_token_reference():
    """Summed next-token cross entropy over real, unmasked targets, against a numpy reference."""
    model, cfg = _model("gpt2")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size, (3, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    loss_mask = np.ones_like(ids)
    loss_mask[2, :4] = 0  # e.g. a prompt whose tokens do not count
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}
    loss_sum, aux = objectives.causal_lm(model, batch)

    logits = np.asarray(model(ids, mask), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected, count, correct = 0.0, 0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):  # position t predicts token t + 1
            if mask[b, t + 1] and loss_mask[b, t + 1]:
                expected -= logp[b, t, ids[b, t + 1]]
                count += 1
                correct += int(np.argmax(logits[b, t]) == ids[b, t + 1])
    assert count == 9 + 6 + 6
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-5)
    assert float(aux["weight"]) == count and float(aux["correct"]) == correct
