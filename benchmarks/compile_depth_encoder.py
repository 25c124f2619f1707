"""Compile time of the encoder's forward + grad against its depth: scanned layers against an unrolled loop.

The encoder's layers are one stacked module run under `jax.lax.scan`
(`clue_jax.models.stacking`), so XLA compiles one layer whatever the
depth. For each depth this times `jax.jit(value_and_grad(loss)).lower(...)
.compile()` (tracing included: it grows with depth too) of a fresh function,
best of `--repeats` (a shared machine makes single timings noisy), for
  scan     - the model as it runs (`Encoder.__call__`);
  unrolled - the same stacked parameters sliced layer by layer in a Python
             loop, what the encoder compiled before the scan (the reference).
Reported: seconds per depth and the ratio deepest / shallowest for each.

    python benchmarks/compile_depth_encoder.py [--smoke] [--depths 2,12] [--width 256]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from clue_jax.models import attention as attn  # noqa: E402
from clue_jax.models import encoder as E  # noqa: E402


def config(width: int, depth: int) -> E.EncoderConfig:
    heads = max(1, width // 64)
    return E.EncoderConfig(vocab_size=1024, hidden_size=width, embedding_size=width, num_layers=depth,
                           num_heads=heads, intermediate_size=4 * width, max_len=128, dropout=0.1)


def unrolled_hidden(model: E.Encoder, ids, mask, dropout_key):
    """Encoder forward with the stacked layers sliced and called one by one (the pre-scan program)."""
    x = model.embeddings(ids, None, None)
    if model.body.embeddings_project is not None:
        x = model.body.embeddings_project(x)
    allowed = attn.allowed_keys(mask, causal=False)
    graphdef, state = nnx.split(model.body.layers)
    keys = jax.random.split(dropout_key, model.cfg.num_layers)
    for i in range(model.cfg.num_layers):
        x = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))(x, allowed, keys[i])
    return x


def scanned_hidden(model: E.Encoder, ids, mask, dropout_key):
    x = model.embeddings(ids, None, None)
    return model.body(x, mask, dropout_key)


def compile_seconds(cfg: E.EncoderConfig, hidden_fn, *, batch: int = 4, seq: int = 64) -> float:
    """Wall seconds to trace, lower and compile forward + grad of a scalar loss of `hidden_fn`."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: E.Encoder(cfg, nnx.Rngs(0))))
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))

    def loss(params, ids, key):  # a fresh function per call: nothing comes from jax's caches
        hidden = hidden_fn(nnx.merge(graphdef, params), ids, jnp.ones_like(ids), key)
        return jnp.mean(jnp.sin(hidden))

    t0 = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(params, ids, key).compile()
    return time.perf_counter() - t0


def measure(depths: list[int], width: int, repeats: int, *, with_unrolled: bool = True, seq: int = 64) -> dict:
    """{"scan"/"unrolled": {"compile_s": {depth: best seconds}, "ratio": deepest / shallowest}}.

    Depths alternate within each repeat, so a change in machine load hits all of them alike.
    """
    out = {}
    for name, fn in (("scan", scanned_hidden), ("unrolled", unrolled_hidden)):
        if name == "unrolled" and not with_unrolled:
            continue
        best = {d: float("inf") for d in depths}
        for _ in range(repeats):
            for d in depths:
                best[d] = min(best[d], compile_seconds(config(width, d), fn, seq=seq))
        out[name] = {"compile_s": {str(d): round(s, 3) for d, s in best.items()},
                     "ratio": round(best[depths[-1]] / best[depths[0]], 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="width 32, one repeat (tests)")
    parser.add_argument("--depths", default="2,12", help="comma-separated layer counts, shallowest first")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="compiles per case; the fastest counts")
    parser.add_argument("--results-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = parser.parse_args()
    depths = sorted(int(d) for d in args.depths.split(","))
    width, repeats = (32, 1) if args.smoke else (args.width, args.repeats)
    load_before = common.load_average()
    result = {"depths": depths, "width": width, "repeats": repeats, **measure(depths, width, repeats),
              "machine": common.machine_info(), "load_average_before": load_before,
              "backend": jax.default_backend()}
    common.write_result("compile_depth_encoder_smoke" if args.smoke else "compile_depth_encoder", result,
                        args.results_dir)


if __name__ == "__main__":
    main()
