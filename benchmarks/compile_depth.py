"""Compile time of a train step against depth: a 32-layer and a 4-layer model of the same width.

The causal LM's layers are stacked and scanned (clue_jax.models.stacking),
so XLA compiles one layer body whatever the depth; an unrolled Python loop
would compile each layer. This lowers and compiles (CPU, `jax.jit(...).lower
(...).compile()` on abstract inputs, nothing allocated) one train step, the
loss, its gradient and an optax AdamW update, for both depths, and reports
the seconds and their ratio (target: at most 1.5). Each depth is compiled
`--repeats` times (a fresh function each time, so no cache answers) and the
fastest counts: a shared machine slows single compiles at random.

    python benchmarks/compile_depth.py            # LLaMA-style, d_model 512, 32 vs 4 layers
    python benchmarks/compile_depth.py --smoke    # tiny widths (tests/test_compile_depth_smoke.py)

Last stdout line: {"deep_layers", "shallow_layers", "deep_compile_s", "shallow_compile_s", "ratio", ...};
also written to benchmarks/results/compile_depth[_smoke].json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import machine_info, write_result  # noqa: E402
from clue_jax.models import config as model_config  # noqa: E402
from clue_jax.models.causal_lm import CausalLM  # noqa: E402

SIZES = {  # width and batch of each mode; the depths are the arguments
    "full": dict(d_model=512, num_heads=8, num_kv_heads=4, mlp_dim=2048, vocab_size=4096, batch=4, seq=256),
    "smoke": dict(d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, vocab_size=128, batch=2, seq=16),
}


def compile_seconds(cfg, batch: int, seq: int) -> tuple[float, float]:
    """(seconds to lower + compile one train step, its XLA FLOP estimate) of a `cfg` model."""
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    tx = optax.adamw(1e-4)

    def step(params, opt_state, rest, ids):
        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(params, jax.eval_shape(tx.init, params), rest, ids).compile()
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return seconds, float(cost.get("flops", 0.0))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny widths")
    parser.add_argument("--deep", type=int, default=32)
    parser.add_argument("--shallow", type=int, default=4)
    parser.add_argument("--flavour", default="llama", choices=("llama", "gemma2", "gpt2"))
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    size = dict(SIZES["smoke" if args.smoke else "full"])
    batch, seq = size.pop("batch"), size.pop("seq")
    make = getattr(model_config, args.flavour)
    if args.flavour == "gpt2":
        size.pop("num_kv_heads")
    times, flops = {}, {}
    for layers in (args.shallow, args.deep):
        cfg = make(num_layers=layers, max_len=seq, remat=args.remat, **size)
        runs = [compile_seconds(cfg, batch, seq) for _ in range(args.repeats)]
        times[layers] = min(s for s, _ in runs)
        flops[layers] = runs[0][1]
        print(f"{layers:3d} layers: compile {times[layers]:.2f} s (all: {[round(s, 2) for s, _ in runs]})",
              file=sys.stderr, flush=True)
    result = {
        "benchmark": "train step (loss + grad + AdamW) lower+compile seconds, scanned layers, CPU",
        "flavour": args.flavour, "remat": args.remat, "batch": batch, "seq_len": seq, **size,
        "deep_layers": args.deep, "shallow_layers": args.shallow,
        "deep_compile_s": round(times[args.deep], 3), "shallow_compile_s": round(times[args.shallow], 3),
        "ratio": round(times[args.deep] / times[args.shallow], 3), "target_ratio": 1.5,
        # XLA's own FLOP estimate of each compiled step, as it reports it for a scanned (while) loop.
        "deep_xla_flops": flops[args.deep], "shallow_xla_flops": flops[args.shallow],
        "repeats": args.repeats, **machine_info(),
    }
    write_result("compile_depth_smoke" if args.smoke else "compile_depth", result, args.results_dir)
    return result


if __name__ == "__main__":
    main()
