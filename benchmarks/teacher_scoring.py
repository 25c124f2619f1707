"""Teacher scoring with LLaMA-3 70B's attention shape on one GPU: cached (a scoring pass) and live (the
teacher scores inside the student's gradient step, one program), at T = 2048 and 8192.

The teacher has the 70B's heads (64 query heads, 8 kv heads of 128, d_model
8192) with 2 layers, a small MLP and vocabulary (what scoring holds per layer
is the attention's: the [B, K, G, block, T] logits of a scan step), in
bfloat16 as `clues.teacher_dtype`; B = 1, query blocks of 128. The student of
the live case is a 2-layer model of 1024 wide; its loss weighs each token by
the teacher's score, so the scores are part of the program. Per case: compile
seconds, XLA's temporary bytes (compiled memory analysis), the device's peak
bytes in use after the call (GPU allocators report it) and the median of 3
calls. The JSON is rewritten after every case, so a timeout keeps the cases
already measured.

    python benchmarks/teacher_scoring.py --results-dir D          # on a GPU (device_check.sh runs it)
    python benchmarks/teacher_scoring.py --results-dir D --smoke  # toy heads at T = 256 on the CPU; lists the
                                                                  # GPU cases as planned, not run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

NAME = "teacher_scoring"
HEADS = {"gpu": dict(d_model=8192, num_heads=64, num_kv_heads=8, head_dim=128),  # LLaMA-3 70B
         "smoke": dict(d_model=64, num_heads=8, num_kv_heads=1, head_dim=8)}
CASES = {"gpu": [(mode, t) for t in (2048, 8192) for mode in ("cached", "live")],
         "smoke": [("cached", 256), ("live", 256)]}
QUERY_BLOCK, REPEATS = 128, 3


def _models(size: str, seq_len: int):
    import jax.numpy as jnp
    from flax import nnx

    from clue_jax.clues import scoring
    from clue_jax.models import config as model_config
    from clue_jax.models.causal_lm import CausalLM

    small = size == "smoke"
    teacher_cfg = model_config.llama(vocab_size=512, num_layers=2, mlp_dim=256 if small else 2048, max_len=seq_len,
                                     **HEADS[size])
    student_cfg = model_config.llama(vocab_size=512, d_model=32 if small else 1024, num_layers=2,
                                     num_heads=4 if small else 8, num_kv_heads=2, mlp_dim=64 if small else 4096,
                                     max_len=seq_len)
    teacher = scoring.in_dtype(CausalLM(teacher_cfg, rngs=nnx.Rngs(0)), jnp.bfloat16)
    return teacher, CausalLM(student_cfg, rngs=nnx.Rngs(1))


def _program(mode: str, teacher, student):
    """(jitted function, its arguments but the batch): cached scoring, or the live step's scores and gradient."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from clue_jax.clues import scoring

    t_graph, t_state = nnx.split(teacher)
    s_graph, s_state = nnx.split(student)

    def scores(t_state, ids, mask):
        return scoring.received_attention(nnx.merge(t_graph, t_state), ids, mask, QUERY_BLOCK)

    if mode == "cached":
        return jax.jit(scores), (t_state,)

    def step(s_state, t_state, ids, mask):
        weight = jax.lax.stop_gradient(scores(t_state, ids, mask))

        def loss(s_state):
            logits = nnx.merge(s_graph, s_state)(ids, mask).astype(jnp.float32)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], axis=-1)[..., 0]
            return -jnp.sum(logp * weight[:, 1:] * mask[:, 1:]) / jnp.maximum(jnp.sum(mask[:, 1:]), 1)

        return jax.value_and_grad(loss)(s_state)

    return jax.jit(step), (s_state, t_state)


def run_case(size: str, mode: str, seq_len: int) -> dict:
    import jax
    import jax.numpy as jnp

    teacher, student = _models(size, seq_len)
    fn, args = _program(mode, teacher, student)
    ids = jax.random.randint(jax.random.key(seq_len), (1, seq_len), 0, 512, jnp.int32)
    mask = jnp.ones_like(ids)
    t0 = time.perf_counter()
    compiled = fn.lower(*args, ids, mask).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(*args, ids, mask))
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args, ids, mask))
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    return {"mode": mode, "T": seq_len, "batch": 1, **HEADS[size], "query_block": QUERY_BLOCK,
            "teacher_dtype": "bfloat16", "compile_s": compile_s, "median_s": statistics.median(times),
            "xla_temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)) if memory is not None else None,
            "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy heads at T = 256 (CPU); the GPU cases listed")
    parser.add_argument("--results-dir", default=None, help=f"where {NAME}.json goes")
    args = parser.parse_args(argv)
    import jax

    size = "smoke" if args.smoke else "gpu"
    if size == "gpu" and jax.default_backend() != "gpu":
        print(f"error: benchmarks/teacher_scoring.py measures a GPU, but JAX's backend is {jax.default_backend()} "
              "(--smoke runs toy sizes on the CPU)", file=sys.stderr)
        sys.exit(3)
    result = {"benchmark": NAME, "smoke": args.smoke, "backend": jax.default_backend(),
              "device": str(jax.devices()[0]), "versions": {"jax": jax.__version__}, "machine": common.machine_info(),
              "gpu_cases": [{"mode": m, "T": t, **HEADS["gpu"]} for m, t in CASES["gpu"]],
              "time_method": f"median of {REPEATS} calls of the compiled program after a warm-up", "results": []}
    for mode, seq_len in CASES[size]:
        row = run_case(size, mode, seq_len)
        result["results"].append(row)
        print(f"{mode} T={seq_len}: {row['median_s']:.3f}s, compile {row['compile_s']:.1f}s, "
              f"temp {row['xla_temp_bytes']} B, peak {row['peak_bytes_in_use']} B", file=sys.stderr, flush=True)
        common.write_result(NAME, result, args.results_dir)  # after each case: a timeout keeps the finished ones
    return result


if __name__ == "__main__":
    main()
