"""KV-cached greedy decoding against the uncached buffer rerun: identical tokens, speed ratio.

Two models, both decoded through `clue_jax.eval.decode.greedy_decode` (the
path QA evaluation and the extraction pipeline use), once with the KV cache
(the default) and once with `kv_cache=False` (every step reruns the model on
the whole [B, P + N] buffer, as decoding did before the cache):
  quickstart - configs/quickstart.py's small model (LLaMA-style, d_model 96,
               3 layers, 4 heads / 2 kv heads, vocab 1024, tied);
  llama3     - LLaMA-3's proportions at CPU size: GQA 4:1, head_dim 64,
               SwiGLU MLP 3.5 x d_model, rope theta 500000 with LLaMA-3 rope
               scaling, untied head, vocab 32 x d_model.
Weights are random, scaled up so the logits have clear winners (greedy
tokens then test the arithmetic, not near-ties). Prompts are left-padded with
random lengths; no stop token, so both paths run all N steps. Rounds
alternate cached and uncached calls so machine load hits both alike; each
side's time is its median round, compile excluded (timed separately).

    python benchmarks/decode.py [--smoke] [--new-tokens 16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from clue_jax.eval import decode  # noqa: E402
from clue_jax.models import config as model_config  # noqa: E402
from clue_jax.models.causal_lm import CausalLM  # noqa: E402

TARGET_RATIO = 3.0


def model_configs(smoke: bool) -> dict[str, model_config.ModelConfig]:
    if smoke:
        return {"quickstart": model_config.llama(vocab_size=128, d_model=32, num_layers=1, num_heads=2,
                                                 num_kv_heads=1, mlp_dim=64, tie_embeddings=True,
                                                 rope_theta=10000.0),
                "llama3": model_config.llama(vocab_size=256, d_model=32, num_layers=1, num_heads=4, num_kv_heads=1,
                                             head_dim=8, mlp_dim=112, rope_scaling=(8.0, 1.0, 4.0, 8192))}
    d = 256
    return {
        "quickstart": model_config.llama(vocab_size=1024, d_model=96, num_layers=3, num_heads=4, num_kv_heads=2,
                                         mlp_dim=256, max_len=256, tie_embeddings=True, rope_theta=10000.0),
        "llama3": model_config.llama(vocab_size=32 * d, d_model=d, num_layers=4, num_heads=4, num_kv_heads=1,
                                     head_dim=64, mlp_dim=int(3.5 * d), rope_scaling=(8.0, 1.0, 4.0, 8192)),
    }


def peaky_model(cfg, seed: int = 0, scale: float = 4.0) -> CausalLM:
    model = CausalLM(cfg, rngs=nnx.Rngs(seed))
    nnx.update(model, jax.tree.map(lambda p: p * scale if p.ndim == 2 else p, nnx.state(model, nnx.Param)))
    return model


def prompts(rng, batch: int, length: int, vocab: int):
    seqs = [list(rng.integers(3, vocab, size=int(n))) for n in rng.integers(length // 2, length + 1, size=batch)]
    return decode.left_pad(seqs, pad_id=0, length=length)


def matmul_flops(cfg, batch: int, prompt: int, new: int, cached: bool) -> float:
    """Matmul FLOPs of one decode call (projections, MLP, LM head, attention scores and values)."""
    h, n, k, d = cfg.head_size, cfg.num_heads, cfg.kv_heads, cfg.d_model
    per_token = 2 * cfg.num_layers * (d * (n + 2 * k) * h + n * h * d + 3 * d * cfg.mlp_dim) + 2 * d * cfg.vocab_size
    slots = prompt + new
    attn_per_query_key = 4 * cfg.num_layers * n * h
    if cached:  # prefill P tokens against S slots, then N - 1 single tokens
        tokens = prompt + new - 1
        keys = prompt * slots + (new - 1) * slots
    else:  # N full passes over the buffer, logits at every column
        tokens = new * slots
        keys = new * slots * slots
    return batch * (tokens * per_token + keys * attn_per_query_key)


def bench_model(name, cfg, args, peak):
    rng = np.random.default_rng(0)
    ids, mask = prompts(rng, args.batch, args.prompt_len, cfg.vocab_size)
    fn = decode.model_logits_fn(peaky_model(cfg))
    calls = {side: (lambda kv=(side == "cached"): decode.greedy_decode(fn, ids, mask, max_new_tokens=args.new_tokens,
                                                                       kv_cache=kv))
             for side in ("cached", "uncached")}
    compile_s, tokens = {}, {}
    for side, call in calls.items():
        t0 = time.perf_counter()
        tokens[side] = call()  # first call: compile + run
        compile_s[side] = time.perf_counter() - t0
    rounds = {side: [] for side in calls}
    deadline = time.perf_counter() + args.max_seconds
    for _ in range(args.rounds):
        for side, call in calls.items():
            rounds[side].append(common.median_time(call, repeats=args.repeats, warmup=0))
        if time.perf_counter() > deadline:
            break
    cached_s, uncached_s = (statistics.median(rounds[s]) for s in ("cached", "uncached"))
    flops = {s: matmul_flops(cfg, args.batch, args.prompt_len, args.new_tokens, s == "cached") for s in calls}
    mismatch = int(np.sum(tokens["cached"] != tokens["uncached"]))
    r = {
        "model": cfg.to_dict(),
        "n_params": int(sum(p.size for p in jax.tree.leaves(nnx.state(nnx.merge(*fn.args), nnx.Param)))),
        "cached_s": cached_s, "uncached_s": uncached_s, "ratio": uncached_s / cached_s,
        "cached_s_all": rounds["cached"], "uncached_s_all": rounds["uncached"],
        "compile_plus_first_call_s": compile_s,
        "identical_tokens": mismatch == 0, "mismatched_tokens": mismatch, "distinct_tokens":
            int(len(np.unique(tokens["cached"]))),
        "matmul_flops": flops,
        "matmul_floor_s": {s: flops[s] / peak for s in calls},
    }
    print(f"{name}: cached {cached_s * 1e3:.1f} ms, uncached {uncached_s * 1e3:.1f} ms, ratio {r['ratio']:.2f}x, "
          f"identical tokens: {r['identical_tokens']} (matmul floor cached {r['matmul_floor_s']['cached'] * 1e3:.1f}"
          f" ms, uncached {r['matmul_floor_s']['uncached'] * 1e3:.1f} ms)", flush=True)
    return r


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round (tests)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="calls per side per round (median)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop starting new rounds after this")
    parser.add_argument("--results-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.prompt_len, args.new_tokens, args.rounds = 2, 8, 3, 1
    load_before = common.load_average()
    peak = common.jax_matmul_flops(n=256 if args.smoke else 2048)
    t0 = time.perf_counter()
    models = {name: bench_model(name, cfg, args, peak) for name, cfg in model_configs(args.smoke).items()}
    result = {
        "benchmark": "decode", "smoke": args.smoke, "new_tokens": args.new_tokens, "batch": args.batch,
        "prompt_len": args.prompt_len, "models": models, "target_ratio": TARGET_RATIO,
        "identical_tokens": all(m["identical_tokens"] for m in models.values()),
        "meets_target": all(m["ratio"] >= TARGET_RATIO for m in models.values()),
        "peak_flops": peak, "wall_s": time.perf_counter() - t0, "jax": jax.__version__,
        "machine": common.machine_info(), "load_average_before": load_before,
    }
    common.write_result("decode_smoke" if args.smoke else "decode", result, args.results_dir)


if __name__ == "__main__":
    main()
