"""Training throughput on the accelerator: tokens/s of the Trainer's jitted step and its MFU, bf16 compute.

The CPU comparison with PyTorch is `train_throughput.py`; this one measures
clue_jax alone on whatever device JAX's default backend is (the GPU in
`benchmarks/device_check.sh`). The model is the same GPT-2-style one
(`train_throughput.ClueJaxSide`), at a size where a GPU has work to do,
computing in bfloat16 with float32 parameters and AdamW moments.

MFU = tokens/s x model FLOPs per token (PaLM: 6 N + 12 L d T, as in
`train_throughput.flops_per_token`) / the bf16 matmul peak measured in this
run by `common.matmul_peak` on the same device, never a datasheet number.

    python benchmarks/device_throughput.py          # GPU size (device_check.sh gives it 100 s; not yet run on a GPU)
    python benchmarks/device_throughput.py --smoke  # tiny, on the CPU (tests/test_device_check.py)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# train_throughput (imported below for its model) pins JAX to the CPU unless told otherwise: here the
# default backend is the point, so an unset JAX_PLATFORMS stays "any" (empty).
os.environ.setdefault("JAX_PLATFORMS", "")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

NAME = "train_throughput"
SIZES = {
    # d_model 1024, 12 layers, T 1024, 16 sequences: 16k tokens and about 2e13 model FLOPs a step
    "gpu": dict(vocab=32768, d_model=1024, layers=12, heads=16, mlp=4096, seq=1024, batch=16,
                steps=20, warmup=2, peak_n=8192, peak_batch=4, peak_repeats=10),
    "smoke": dict(vocab=64, d_model=32, layers=1, heads=2, mlp=64, seq=16, batch=4,
                  steps=2, warmup=1, peak_n=128, peak_batch=1, peak_repeats=3),
}
DTYPE = "bfloat16"


def _peak_memory_bytes(device) -> int | None:
    """The allocator's peak on the device (GPU/TPU); None where JAX reports none (the CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def run_benchmark(size: dict, steps: int, warmup: int) -> dict:
    import jax

    from benchmarks import train_throughput as tt

    t_start = time.perf_counter()
    peak = common.matmul_peak(size["peak_n"], DTYPE, size["peak_repeats"], batch=size["peak_batch"])
    tokens_per_step = size["batch"] * size["seq"]
    with tempfile.TemporaryDirectory() as workdir:
        side = tt.ClueJaxSide(size, tt.make_batches(size), workdir, dtype=DTYPE)
        first_step_s = side.run(1)  # trace + compile + one step
        if warmup > 1:
            side.run(warmup - 1)
        step_s_all = [side.run(1) for _ in range(steps)]  # one blocked step each: a distribution, not one mean
        compilations = side.compilations()
    step_s = statistics.median(step_s_all)
    fpt = tt.flops_per_token(side.n_params - side.position_params, size)
    tokens_per_s = tokens_per_step / step_s
    device = jax.devices()[0]
    return {
        "benchmark": NAME,
        "backend": jax.default_backend(),
        "device": str(device),
        "device_kind": getattr(device, "device_kind", ""),
        "compute_dtype": DTYPE,
        "param_dtype": "float32",
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * fpt / peak["flops"],
        "matmul_peak_flops": peak["flops"],
        "matmul_peak": peak,
        "flops_per_token": fpt,
        "model_flops_per_s": tokens_per_s * fpt,
        "step_s": step_s,
        "step_s_all": step_s_all,
        "first_step_s": first_step_s,
        "compile_s": max(first_step_s - step_s, 0.0),
        "step_compilations": compilations,
        "peak_memory_bytes": _peak_memory_bytes(device),
        "losses": side.losses,
        "n_params": side.n_params,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "tokens_per_step": tokens_per_step,
        "model": {k: size[k] for k in ("vocab", "d_model", "layers", "heads", "mlp", "seq", "batch")},
        "versions": {"jax": jax.__version__},
        "machine": common.machine_info(),
        "wall_s": time.perf_counter() - t_start,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 steps: checks the script runs (CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps")
    parser.add_argument("--results-dir", default=None, help="where train_throughput.json goes")
    args = parser.parse_args(argv)
    size = SIZES["smoke" if args.smoke else "gpu"]
    steps = args.steps or size["steps"]
    result = run_benchmark(size, steps, size["warmup"])
    result["smoke"] = bool(args.smoke)
    print(f"{result['backend']} ({result['device_kind']}): {result['tokens_per_s']:.0f} tok/s, "
          f"step {result['step_s'] * 1e3:.1f} ms, compile {result['compile_s']:.1f} s, MFU {result['mfu']:.1%} "
          f"of a measured bf16 matmul peak of {result['matmul_peak_flops'] / 1e12:.1f} TFLOP/s", flush=True)
    common.write_result(NAME, result, args.results_dir)
    return result


if __name__ == "__main__":
    main()
