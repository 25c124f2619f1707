"""Clue dropout's cost inside the train step: cached scores and live teachers vs the plain step.

Three jitted Trainer steps on the quickstart's small student (LLaMA-style,
d_model 96, 3 layers; batch 16 x 96 tokens of real biographies' lengths):
  plain   - no augmentation;
  cached  - clue dropout from per-token scores stored beside the tokens
            (rank, p(r), Bernoulli draws, deletion and compaction in the step);
  live    - the large and small teachers score each batch inside the step,
            then the same dropout.
Rounds of k steps alternate between the variants so machine load hits all
alike; each variant's time per step is its median round. Target: cached /
plain <= 1.05. The live overhead is reported, not targeted.

    python benchmarks/augment_overhead.py [--smoke]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from clue_jax.clues import dropout  # noqa: E402
from clue_jax.models import config as model_config  # noqa: E402
from clue_jax.models.causal_lm import CausalLM  # noqa: E402
from clue_jax.pipelines.continual import live_transform  # noqa: E402
from clue_jax.parallel import mesh as mesh_lib, rules as sharding  # noqa: E402
from clue_jax.train import defaults, loop, objectives  # noqa: E402


def make_batch(rng, batch, seq, vocab):
    lengths = rng.integers(int(seq * 0.6), seq, size=batch)
    ids = rng.integers(4, vocab, size=(batch, seq)).astype(np.int32)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    ids[:, 0] = 0
    ids = np.where(mask > 0, ids, 2)
    scores = rng.random((2, batch, seq)).astype(np.float32) * mask
    return {"input_ids": ids, "attention_mask": mask, "scores_large": scores[0], "scores_small": scores[1]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps (tests)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--results-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps = 2, 2
    d = 32 if args.smoke else 96
    small = model_config.llama(vocab_size=1024, d_model=d, num_layers=1 if args.smoke else 3, num_heads=4,
                               num_kv_heads=2, mlp_dim=2 * d if args.smoke else 256, tie_embeddings=True)
    large = model_config.llama(vocab_size=1024, d_model=2 * d, num_layers=1 if args.smoke else 4, num_heads=4,
                               num_kv_heads=4, mlp_dim=4 * d if args.smoke else 448, tie_embeddings=True)
    batch_size, seq = (4, 32) if args.smoke else (16, 96)
    mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    drop = dropout.DropoutConfig(method="contrast", alpha=0.7, beta=0.03, protected_ids=(0, 2), pad_id=2)
    cached = lambda rng, batch, extras: dropout.augment_batch(rng, batch, None, drop)
    teachers = {"large": CausalLM(large, rngs=nnx.Rngs(1)), "small": CausalLM(small, rngs=nnx.Rngs(2))}
    live, teacher_states = live_transform(teachers, drop, query_block=64)
    variants = {"plain": (None, None), "cached": (cached, None), "live": (live, teacher_states)}
    batch = make_batch(np.random.default_rng(0), batch_size, seq, 1024)
    tcfg = defaults.train_config(steps=10**6, batch_size=batch_size, seq_len=seq)
    trainers, compile_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (transform, extras) in variants.items():
            extras_sh = None if extras is None else sharding.state_shardings(extras, mesh)
            trainers[name] = loop.Trainer(CausalLM(small, rngs=nnx.Rngs(0)), objectives.causal_lm, tcfg, mesh,
                                          os.path.join(tmp, name), transform=transform, extras=extras,
                                          extras_shardings=extras_sh)
        gbatch = trainers["plain"].global_batch(batch)

        def run(name, n):
            tr = trainers[name]
            for _ in range(n):
                tr.state, metrics = tr._step_fn(tr.state, gbatch, tr.frozen, tr.extras)
            jax.block_until_ready(metrics["loss"])

        for name in variants:
            t0 = time.perf_counter()
            run(name, 1)
            compile_s[name] = time.perf_counter() - t0
        per_step = {name: [] for name in variants}
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                t0 = time.perf_counter()
                run(name, args.steps)
                per_step[name].append((time.perf_counter() - t0) / args.steps)
    median = {k: statistics.median(v) for k, v in per_step.items()}
    result = {
        "plain_step_s": median["plain"],
        "cached_step_s": median["cached"],
        "live_step_s": median["live"],
        "cached_over_plain": median["cached"] / median["plain"],
        "live_over_plain": median["live"] / median["plain"],
        "target_cached_over_plain": 1.05,
        "meets_target": median["cached"] / median["plain"] <= 1.05,
        "compile_s": compile_s,
        "batch": [batch_size, seq],
        "smoke": args.smoke,
        "machine": common.machine_info(),
    }
    common.write_result("augment_overhead_smoke" if args.smoke else "augment_overhead", result, args.results_dir)


if __name__ == "__main__":
    main()
