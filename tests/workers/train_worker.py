"""A tiny training run in its own process, for kill -9 / SIGTERM / resume tests.

usage: train_worker.py WORKDIR STEPS [SLEEP_PER_STEP]
Writes WORKDIR/final_params.npz at the end.
"""
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
from flax import nnx

from clue_jax.data.batching import ArrayBatchSource
from clue_jax.models import config as model_config
from clue_jax.models.causal_lm import CausalLM
from clue_jax.parallel import mesh
from clue_jax.train import defaults, loop, objectives


class SlowSource(ArrayBatchSource):
    def __init__(self, *args, sleep=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.sleep = sleep

    def batch(self, step, rows=None):
        time.sleep(self.sleep)
        return super().batch(step, rows)


def tiny_data(n=64, t=16, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab - t, size=(n, 1))
    ids = (start + np.arange(t)[None]) % vocab
    return {"input_ids": ids.astype(np.int32), "attention_mask": np.ones((n, t), np.int32)}


def main():
    workdir, steps = sys.argv[1], int(sys.argv[2])
    sleep = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    cfg = model_config.gpt2(vocab_size=64, d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=16)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    train_cfg = defaults.train_config(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, log_every=1,
                                      checkpoint_every=2, keep_checkpoints=3)
    m = mesh.make_mesh((1, 1, 1), jax.devices()[:1])
    trainer = loop.Trainer(model, objectives.causal_lm, train_cfg, m, workdir, meta={"model": cfg.to_dict()})
    result = trainer.run(SlowSource(tiny_data(), batch_size=8, seed=0, sleep=sleep))
    leaves = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(
        nnx.state(result.model, nnx.Param))}
    np.savez(os.path.join(workdir, "final_params.npz"), **leaves)
    print(f"status={result.status} step={result.step}", flush=True)


if __name__ == "__main__":
    main()
