"""The planned fused attention against XLA's: same outputs (max |diff|) and time, bf16, causal and windowed.

For each shape, three calls of `clue_jax.models.attention`:
- planned: `causal_attention` with the plan `plan_attention` makes for this
  backend (cuDNN on a GPU for bf16, the dense mask path on a CPU);
- xla: the same arguments (is_causal, local_window_size, sequence lengths)
  with `implementation="xla"`, i.e. XLA's own attention;
- reference: the dense einsum path in float32 on the same (bf16) inputs.
Row 0 of each batch is right-padded by an eighth, so the sequence-length
arguments are exercised; differences count real tokens only. Times are the
median of jitted calls after a warm-up, forward and forward + backward
(gradients of q, k, v), the two implementations interleaved.

    python benchmarks/attention_backends.py          # GPU shapes, T up to 8192 (device_check.sh gives it 80 s)
    python benchmarks/attention_backends.py --smoke  # tiny, on the CPU (tests/test_device_check.py)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "")  # the default backend is the point
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

NAME = "attention"
# (batch, seq_len, heads, kv_heads, head_dim, sliding_window)
CASES = {
    "gpu": [(4, 2048, 32, 8, 128, 0), (1, 8192, 32, 8, 128, 0), (1, 8192, 32, 8, 128, 1024),
            (8, 1024, 16, 16, 64, 0)],  # LLaMA-3 8B's heads, at 2k and 8k, a window; GPT-2's heads
    "smoke": [(2, 64, 4, 2, 16, 0), (2, 64, 4, 2, 16, 16)],
}
REPEATS = {"gpu": 10, "smoke": 2}
DTYPE = "bfloat16"
# bf16 has 8 bits of mantissa: outputs (|o| <~ 1) agree with a float32 reference to about 1e-2
TOLERANCE = 3e-2


def _inputs(b, t, n, kv, h, seed=0):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32).astype(DTYPE)
    k = jax.random.normal(keys[1], (b, t, kv, h), jnp.float32).astype(DTYPE)
    v = jax.random.normal(keys[2], (b, t, kv, h), jnp.float32).astype(DTYPE)
    mask = jnp.ones((b, t), jnp.int32).at[0, t - t // 8:].set(0)
    return q, k, v, mask


def _max_diff(a, b, mask) -> float:
    import jax.numpy as jnp

    diff = jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)) * mask[:, :, None, None]
    return float(jnp.max(diff))


def run_case(case: tuple, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from clue_jax.models import attention as attn

    b, t, n, kv, h, window = case
    scale = h**-0.5
    q, k, v, mask = _inputs(b, t, n, kv, h)
    planned = attn.plan_attention(attn.backend(), batch=b, seq_len=t, num_heads=n, num_kv_heads=kv, head_dim=h,
                                  dtype=q.dtype, scale=scale, softcap=0.0, sliding_window=window)
    xla = dataclasses.replace(planned, implementation="xla", kwargs={
        "scale": scale, "is_causal": True, "implementation": "xla",
        "local_window_size": (window - 1, 0) if window and window < t else None})
    plans = {"planned": planned, "xla": xla}

    def forward(plan):
        return jax.jit(lambda q, k, v, m: attn.causal_attention(q, k, v, m, scale=scale, sliding_window=window,
                                                                 plan=plan))

    def backward(plan):
        def loss(q, k, v, m):
            out = attn.causal_attention(q, k, v, m, scale=scale, sliding_window=window, plan=plan)
            return jnp.sum(out.astype(jnp.float32) * m[:, :, None, None])
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    ref = jax.jit(lambda q, k, v, m: attn.attend(q, k, v, attn.allowed_keys(m, window), scale=scale, fast=False))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out_ref = ref(*f32, mask)
    row = {"batch": b, "seq_len": t, "heads": n, "kv_heads": kv, "head_dim": h, "sliding_window": window,
           "planned_implementation": planned.implementation}
    outs, fns = {}, {}
    for name, plan in plans.items():
        try:
            fns[name] = (forward(plan), backward(plan))
            outs[name] = jax.block_until_ready(fns[name][0](q, k, v, mask))
            grads = jax.block_until_ready(fns[name][1](q, k, v, mask))  # compile the backward pass too
            row[f"{name}_grads_finite"] = all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in grads)
            row[f"{name}_vs_reference_max_abs_diff"] = _max_diff(outs[name], out_ref, mask)
        except Exception as e:  # noqa: BLE001 - one path failing (no cuDNN kernel for a shape) is a result
            row[f"{name}_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    if len(outs) == 2:
        row["planned_vs_xla_max_abs_diff"] = _max_diff(outs["planned"], outs["xla"], mask)
    times = {f"{name}_{kind}_s": [] for name in fns for kind in ("forward", "backward")}
    for _ in range(repeats):  # interleaved, so a change of clocks or load hits both alike
        for name, (fwd, bwd) in fns.items():
            for kind, fn in (("forward", fwd), ("backward", bwd)):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(q, k, v, mask))
                times[f"{name}_{kind}_s"].append(time.perf_counter() - t0)
    row.update({key: statistics.median(ts) for key, ts in times.items()})
    if len(fns) == 2:
        row["forward_speedup"] = row["xla_forward_s"] / row["planned_forward_s"]
        row["backward_speedup"] = row["xla_backward_s"] / row["planned_backward_s"]
    diffs = [row.get(f"{name}_vs_reference_max_abs_diff", math.inf) for name in plans]
    row["ok"] = ("planned_vs_xla_max_abs_diff" in row and all(d <= TOLERANCE for d in diffs)
                 and row.get("planned_grads_finite", False) and row.get("xla_grads_finite", False))
    return row


def run_benchmark(cases: list[tuple], repeats: int, smoke: bool = False, results_dir=None) -> dict:
    """Every case in turn; the JSON is rewritten after each one, so a timeout keeps the finished cases."""
    import jax

    t_start = time.perf_counter()
    rows = []
    result = {
        "benchmark": NAME,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "dtype": DTYPE,
        "smoke": smoke,
        "tolerance_vs_float32_reference": TOLERANCE,
        "time_method": f"median of {repeats} jitted calls per path after a warm-up, interleaved",
        "results": rows,
        "versions": {"jax": jax.__version__},
        "machine": common.machine_info(),
    }
    for case in cases:
        rows.append(run_case(case, repeats))
        r = rows[-1]
        print(f"B={r['batch']} T={r['seq_len']} N={r['heads']}/{r['kv_heads']} H={r['head_dim']} "
              f"window={r['sliding_window']}: {r['planned_implementation']} vs xla "
              f"diff {r.get('planned_vs_xla_max_abs_diff', 'n/a')}, "
              f"forward x{r.get('forward_speedup', float('nan')):.2f}, "
              f"backward x{r.get('backward_speedup', float('nan')):.2f}, ok {r['ok']}", file=sys.stderr, flush=True)
        result.update(ok=all(r["ok"] for r in rows), wall_s=time.perf_counter() - t_start)
        common.write_result(NAME, result, results_dir)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    parser.add_argument("--results-dir", default=None, help="where attention.json goes")
    args = parser.parse_args(argv)
    size = "smoke" if args.smoke else "gpu"
    return run_benchmark(CASES[size], REPEATS[size], smoke=bool(args.smoke), results_dir=args.results_dir)


if __name__ == "__main__":
    main()
