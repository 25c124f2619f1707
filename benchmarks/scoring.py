"""Received-attention scoring: clue_jax's blocked path against the naive full-matrix path.

Both sides score the SAME random GPT-2-style model (weights drawn once here
and loaded by both) on one sequence of T tokens:
- clue_jax: `scoring.make_scorer` (jitted, float32, query blocks of 128),
  which never holds a T x T matrix;
- naive: PyTorch transformers GPT2LMHeadModel (eager attention) with
  `output_attentions=True`, the authors' way, then s_j from the returned
  matrices (summed per layer as they come, so the naive side holds only the
  L x H x T x T tuple transformers returns, not a stacked copy).
The two score vectors are compared (max_abs_diff) so the speed is not
bought with a wrong answer.

Memory (honest on a CPU, where neither side has an allocator that reports a
peak): each side runs in a fresh subprocess; after the model is built and
one warm-up call has run (so JAX has compiled), freed heap is returned to
the OS (glibc malloc_trim), the kernel's peak-RSS mark is reset
(`echo 5 > /proc/self/clear_refs`), one call runs, and the reported peak is
VmHWM after the call minus VmRSS before it: the extra resident memory that
one scoring call needs. For JAX, XLA's own compiled memory analysis
(temp buffers) is reported as a cross-check, and for torch the bytes of the
returned attention tensors.

Time: median of several calls after the warm-up; JAX's compile time is the
AOT lower+compile time, reported separately. Both sides are pinned to the
same CPUs (sched_setaffinity) with as many threads as CPUs (torch
set_num_threads; XLA's multi-threaded Eigen off for one CPU). The default is
one CPU: on a shared 2-core machine, torch's OpenMP at 2 threads slows down
several-fold whenever another process takes a core, which measures the
neighbours rather than the method (`--threads 2` to see it).

Run: python benchmarks/scoring.py   (about 3 to 5 minutes on 2 cores)
Last stdout line: a JSON object; also written to benchmarks/results/scoring.json.

Skipped key blocks: `python benchmarks/scoring.py --skip-blocks` (about a
minute) times one attention layer's `attend_and_score` (which visits only the
key blocks a query block can see) against the previous implementation that
visited every key block (kept below as `_all_key_blocks`), at T = 2048 and
8192 (and a 1024 sliding window at 8192), B = 1, 4 heads of 64, query
blocks of 128, jitted, float32; median of 3 interleaved calls per side, same
scores checked. Written to benchmarks/results/scoring_blocks.json. `--smoke`
with it: T = 256 only, one call (tests); on a GPU `benchmarks/device_check.sh`
runs it there.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(vocab_size=2048, d_model=256, num_layers=4, num_heads=4, mlp_dim=1024, max_len=2048)
LENGTHS = (512, 1024, 2048)
QUERY_BLOCK = 128
TARGETS = {"mem_ratio_at_2048": 0.2, "time_ratio": 1.0}


def make_weights(path: str, seed: int = 0) -> None:
    """GPT-2 weights under HF names (Conv1D layout [in, out]); std 0.02 like GPT-2's init."""
    rng = np.random.default_rng(seed)
    d, f, v, p = MODEL["d_model"], MODEL["mlp_dim"], MODEL["vocab_size"], MODEL["max_len"]
    w = {"transformer.wte.weight": (v, d), "transformer.wpe.weight": (p, d)}
    for i in range(MODEL["num_layers"]):
        h = f"transformer.h.{i}."
        w.update({h + "attn.c_attn.weight": (d, 3 * d), h + "attn.c_attn.bias": (3 * d,),
                  h + "attn.c_proj.weight": (d, d), h + "attn.c_proj.bias": (d,),
                  h + "mlp.c_fc.weight": (d, f), h + "mlp.c_fc.bias": (f,),
                  h + "mlp.c_proj.weight": (f, d), h + "mlp.c_proj.bias": (d,)})
    arrays = {k: (rng.standard_normal(s) * 0.02).astype(np.float32) for k, s in w.items()}
    for i in range(MODEL["num_layers"]):
        for ln in ("ln_1", "ln_2"):
            arrays[f"transformer.h.{i}.{ln}.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
            arrays[f"transformer.h.{i}.{ln}.bias"] = (0.1 * rng.standard_normal(d)).astype(np.float32)
    arrays["transformer.ln_f.weight"] = np.ones(d, np.float32)
    arrays["transformer.ln_f.bias"] = np.zeros(d, np.float32)
    np.savez(path, **arrays)


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_call(fn) -> int:
    """Extra resident bytes one call of fn needs (peak RSS during it minus RSS before it)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _rss_now()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current RSS
    fn()
    return _peak_rss() - before


def _times(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _inputs(t: int):
    ids = np.random.default_rng(t).integers(0, MODEL["vocab_size"], size=(1, t)).astype(np.int32)
    return ids, np.ones((1, t), np.int32)


def _pin(threads: int) -> None:
    """Pins this process to `threads` of its allowed CPUs (before jax or torch start their pools)."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, set(cpus))


def worker_jax(weights: str, t: int, repeats: int, scores_out: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    sys.path.insert(0, ROOT)
    from clue_jax.clues import scoring
    from clue_jax.models import config as mc
    from clue_jax.models.causal_lm import CausalLM

    cfg = mc.gpt2(**MODEL)
    model = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    w = np.load(weights)
    d = cfg.d_model
    params = {("embed_tokens", "embedding"): w["transformer.wte.weight"],
              ("embed_positions", "embedding"): w["transformer.wpe.weight"],
              ("final_norm", "scale"): w["transformer.ln_f.weight"], ("final_norm", "bias"): w["transformer.ln_f.bias"]}
    per_layer = [{} for _ in range(cfg.num_layers)]  # the model stacks its layers: one [L, ...] array per param
    for i, layer in enumerate(per_layer):
        h = f"transformer.h.{i}."
        blk = ("blocks",)
        c_w, c_b = w[h + "attn.c_attn.weight"], w[h + "attn.c_attn.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            layer[blk + ("attn", name, "kernel")] = c_w[:, j * d:(j + 1) * d]
            layer[blk + ("attn", name, "bias")] = c_b[j * d:(j + 1) * d]
        layer[blk + ("attn", "o_proj", "kernel")] = w[h + "attn.c_proj.weight"]
        layer[blk + ("attn", "o_proj", "bias")] = w[h + "attn.c_proj.bias"]
        layer[blk + ("mlp", "up_proj", "kernel")] = w[h + "mlp.c_fc.weight"]
        layer[blk + ("mlp", "up_proj", "bias")] = w[h + "mlp.c_fc.bias"]
        layer[blk + ("mlp", "down_proj", "kernel")] = w[h + "mlp.c_proj.weight"]
        layer[blk + ("mlp", "down_proj", "bias")] = w[h + "mlp.c_proj.bias"]
        for ours, theirs in (("input_norm", "ln_1"), ("mlp_norm", "ln_2")):
            layer[blk + (ours, "scale")] = w[h + theirs + ".weight"]
            layer[blk + (ours, "bias")] = w[h + theirs + ".bias"]
    params.update({key: np.stack([layer[key] for layer in per_layer]) for key in per_layer[0]})
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    missing = set(k for k, v in flat.items() if isinstance(v, nnx.Param)) - set(params)
    assert not missing, missing
    for key, value in params.items():
        flat[key] = flat[key].replace(jnp.asarray(value))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))

    scorer = scoring.make_scorer(model, query_block=QUERY_BLOCK)
    ids, mask = _inputs(t)
    t0 = time.perf_counter()
    compiled = scorer.lower(ids, mask).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_temp = int(getattr(mem, "temp_size_in_bytes", -1)) if mem is not None else -1
    call = lambda: scorer(ids, mask).block_until_ready()  # noqa: E731
    call()  # warm-up: jit's own compile (the AOT one above is only for timing and the memory analysis)
    peak = measure_call(call)
    times = _times(call, repeats)
    np.save(scores_out, np.asarray(scorer(ids, mask))[0])
    return {"peak_extra_rss_bytes": peak, "xla_temp_bytes": xla_temp, "compile_s": compile_s,
            "median_s": statistics.median(times), "times_s": times, "jax": jax.__version__}


def worker_torch(weights: str, t: int, repeats: int, scores_out: str, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    tcfg = transformers.GPT2Config(vocab_size=MODEL["vocab_size"], n_positions=MODEL["max_len"],
                                   n_embd=MODEL["d_model"], n_layer=MODEL["num_layers"], n_head=MODEL["num_heads"],
                                   n_inner=MODEL["mlp_dim"], bos_token_id=0, eos_token_id=0,
                                   attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(tcfg).eval()
    w = np.load(weights)
    state = {k: torch.from_numpy(w[k]) for k in w.files}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "attn.bias" not in m and "masked_bias" not in m], missing
    ids, mask = (torch.from_numpy(a.astype(np.int64)) for a in _inputs(t))
    n = mask.sum(-1, keepdim=True) - torch.arange(t)[None, :]  # real queries i >= j (no padding here)
    holder = {}

    def call():
        with torch.no_grad():
            out = model(ids, attention_mask=mask, output_attentions=True)
            colsum = sum(a.sum(dim=(1, 2)) for a in out.attentions)  # over heads and queries, per layer
            holder["s"] = colsum / (MODEL["num_layers"] * MODEL["num_heads"] * n)
            holder["attn_bytes"] = sum(a.numel() * a.element_size() for a in out.attentions)

    call()  # warm-up
    peak = measure_call(call)
    times = _times(call, repeats)
    np.save(scores_out, holder["s"][0].numpy())
    return {"peak_extra_rss_bytes": peak, "attention_tensor_bytes": holder["attn_bytes"], "compile_s": 0.0,
            "median_s": statistics.median(times), "times_s": times, "torch": torch.__version__,
            "transformers": transformers.__version__}


def _run_worker(side: str, weights: str, t: int, repeats: int, threads: int, tmp: str) -> tuple[dict, np.ndarray]:
    scores = os.path.join(tmp, f"{side}_{t}.npy")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS=str(threads))
    env.pop("XLA_FLAGS", None)  # one plain CPU device, no fake devices
    if threads == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--weights", weights, "--length", str(t),
           "--repeats", str(repeats), "--threads", str(threads), "--scores-out", scores]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{side} worker T={t} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(scores)


SKIP_CASES = ((2048, 0), (8192, 0), (8192, 1024))


def _all_key_blocks(q, k, v, key_mask, *, scale, sliding_window, block):
    """The previous scoring attention: every query block against all T keys (the baseline)."""
    import jax
    import jax.numpy as jnp

    from clue_jax.models import attention as attn

    b, t, n, h = q.shape
    q_blocks = q.reshape(b, t // block, block, n, h).swapaxes(0, 1)
    k_idx = jnp.arange(t)
    key_ok = key_mask[:, None, :] > 0

    def step(colsum, xs):
        qb, start = xs
        q_idx = start + jnp.arange(block)
        ok = k_idx[None, :] <= q_idx[:, None]
        if sliding_window:
            ok = ok & (q_idx[:, None] - k_idx[None, :] < sliding_window)
        logits = jnp.where((ok[None] & key_ok)[:, None, None], attn._logits(qb, k, scale, 0.0), attn._MASKED)
        probs = jax.nn.softmax(logits, axis=-1)
        colsum = colsum + jnp.einsum("bkgqs,bq->bs", probs, jnp.ones((b, block)))
        return colsum, attn._weighted_values(probs, v, q.dtype)

    colsum, outs = jax.lax.scan(step, jnp.zeros((b, t)), (q_blocks, jnp.arange(t // block) * block))
    return outs.swapaxes(0, 1).reshape(b, t, n, h), colsum


SKIP_CASES_SMOKE = ((256, 0), (256, 128))  # seconds on a CPU (tests/test_device_check.py)


def skip_blocks_main(out_path: str, repeats: int = 3, cases=SKIP_CASES) -> dict:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, ROOT)
    from clue_jax.models import attention as attn

    rows = []
    result = {"benchmark": "scoring attention, visible key blocks only vs every key block (one layer)",
              "shape": dict(batch=1, heads=4, head_dim=64, query_block=QUERY_BLOCK, dtype="float32"),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
                          "backend": jax.default_backend(), "device": str(jax.devices()[0])},
              "time_method": f"median of {repeats} jitted calls per side, interleaved, after a warm-up call",
              "results": rows}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    for t, window in cases:
        keys = jax.random.split(jax.random.key(t), 3)
        q, k, v = (jax.random.normal(key, (1, t, 4, 64), jnp.float32) for key in keys)
        mask = jnp.ones((1, t), jnp.int32)
        request = attn.ScoreRequest(query_block=QUERY_BLOCK)
        new = jax.jit(lambda q, k, v: attn.attend_and_score(q, k, v, mask, scale=0.125, softcap=0.0,
                                                            sliding_window=window, request=request)[:2])
        old = jax.jit(lambda q, k, v: _all_key_blocks(q, k, v, mask, scale=0.125, sliding_window=window,
                                                      block=QUERY_BLOCK))
        (o_new, c_new), (o_old, c_old) = jax.block_until_ready((new(q, k, v), old(q, k, v)))  # compile, warm up
        times = {new: [], old: []}
        for _ in range(repeats):  # interleaved, so a busy neighbour slows both sides alike
            for fn in (new, old):
                times[fn] += _times(lambda: jax.block_until_ready(fn(q, k, v)), 1)
        t_new, t_old = statistics.median(times[new]), statistics.median(times[old])
        rows.append({"T": t, "sliding_window": window, "skipping_s": t_new, "all_blocks_s": t_old,
                     "speedup": t_old / t_new, "colsum_max_abs_diff": float(jnp.max(jnp.abs(c_new - c_old))),
                     "out_max_abs_diff": float(jnp.max(jnp.abs(o_new - o_old)))})
        print(f"T={t} window={window}: skipping {t_new:.3f}s, all blocks {t_old:.3f}s "
              f"({t_old / t_new:.2f}x), colsum diff {rows[-1]['colsum_max_abs_diff']:.1e}", file=sys.stderr, flush=True)
        with open(out_path + ".tmp", "w") as f:  # after each case: a timeout keeps the finished ones
            json.dump(result, f, indent=2)
        os.replace(out_path + ".tmp", out_path)
    print(json.dumps(result))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("jax", "torch"))
    parser.add_argument("--weights")
    parser.add_argument("--length", type=int)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scores-out")
    parser.add_argument("--lengths", type=int, nargs="*", default=list(LENGTHS))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "scoring.json"))
    parser.add_argument("--skip-blocks", action="store_true", help="time skipped key blocks (see the docstring)")
    parser.add_argument("--smoke", action="store_true", help="with --skip-blocks: T = 256 only, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke and not args.skip_blocks:
        parser.error("--smoke applies to --skip-blocks only")
    if args.skip_blocks:
        out = args.out if "--out" in (argv or sys.argv) else os.path.join(os.path.dirname(args.out),
                                                                          "scoring_blocks.json")
        if args.smoke:
            return skip_blocks_main(out, repeats=1, cases=SKIP_CASES_SMOKE)
        return skip_blocks_main(out)

    if args.worker:
        _pin(args.threads)
    if args.worker == "jax":
        print(json.dumps(worker_jax(args.weights, args.length, args.repeats, args.scores_out)))
        return {}
    if args.worker == "torch":
        print(json.dumps(worker_torch(args.weights, args.length, args.repeats, args.scores_out, args.threads)))
        return {}

    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.npz")
        make_weights(weights)
        for t in args.lengths:
            jx, s_jax = _run_worker("jax", weights, t, args.repeats, args.threads, tmp)
            th, s_torch = _run_worker("torch", weights, t, args.repeats, args.threads, tmp)
            rows.append({
                "T": t, "jax": jx, "torch": th,
                "mem_ratio": jx["peak_extra_rss_bytes"] / max(th["peak_extra_rss_bytes"], 1),
                "time_ratio": jx["median_s"] / th["median_s"],
                "max_abs_diff": float(np.max(np.abs(s_jax - s_torch))),
                "max_abs_score": float(np.max(np.abs(s_torch))),
            })
            print(f"T={t}: jax {jx['median_s']:.3f}s (compile {jx['compile_s']:.1f}s) "
                  f"{jx['peak_extra_rss_bytes'] / 2**20:.1f} MiB | torch {th['median_s']:.3f}s "
                  f"{th['peak_extra_rss_bytes'] / 2**20:.1f} MiB | max|diff| {rows[-1]['max_abs_diff']:.2e}",
                  file=sys.stderr, flush=True)
    longest = max(rows, key=lambda r: r["T"])
    result = {
        "benchmark": "received-attention scoring, clue_jax blocked (jit, f32) vs transformers output_attentions",
        "model": dict(MODEL, flavour="gpt2", batch=1, query_block=QUERY_BLOCK),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads},
        "memory_method": "fresh subprocess per side; after warm-up: malloc_trim, reset VmHWM via "
                         "/proc/self/clear_refs, one call; peak = VmHWM - VmRSS before the call",
        "time_method": f"median of {args.repeats} calls after a warm-up call; JAX compile (AOT lower+compile) separate",
        "results": rows,
        "targets": TARGETS,
        "met": {
            "mem_ratio_at_longest": longest["mem_ratio"] <= TARGETS["mem_ratio_at_2048"],
            "time_ratio_all": all(r["time_ratio"] <= TARGETS["time_ratio"] for r in rows),
        },
        "wall_s": time.perf_counter() - start,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
