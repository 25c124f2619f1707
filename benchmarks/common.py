"""Small helpers every benchmark shares: timing, matmul peak, machine facts, JSON output.

Each benchmark writes `benchmarks/results/<name>.json` and prints the same
JSON object as the LAST line of stdout, so a script (or a test) can read the
result without knowing where files go. Numbers are always measured in the
run that reports them; nothing here holds a constant result.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_count() -> int:
    """Cores this process may run on (affinity-aware, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """1/5/15-minute load; recorded because a busy machine skews every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average": load_average(),
    }


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` after `warmup` untimed ones.

    `fn` must block until its work is done (e.g. jax.block_until_ready), or
    the time measures dispatch only.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median seconds per call: robust to the odd slow call on a shared machine."""
    return statistics.median(time_calls(fn, repeats, warmup))


def jax_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 FLOP/s of an n x n jnp.dot on the default JAX device (a peak, so the fastest call)."""
    return matmul_peak(n, "float32", repeats)["flops"]


def matmul_peak(n: int, dtype: str = "bfloat16", repeats: int = 5, batch: int = 1) -> dict[str, Any]:
    """The matmul peak of the default JAX device, measured: `batch` products [n, n] x [n, n] in `dtype` per call.

    Random operands (zeros run faster on a GPU), one jitted call per timing,
    blocked on; the fastest of `repeats` calls counts (a peak). On a GPU a
    few 8192-sized products per call keep launch overhead under a percent.
    Returns the FLOP/s and how it was measured, for a result's JSON.
    """
    import jax
    import jax.numpy as jnp

    shape = (n, n) if batch == 1 else (batch, n, n)  # one plain 2-D product unless asked for more
    a = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(jnp.matmul)
    times = time_calls(lambda: dot(a, b).block_until_ready(), repeats, warmup=1)
    return {"flops": 2.0 * batch * n**3 / min(times), "n": n, "batch": batch, "dtype": str(jnp.dtype(dtype)),
            "repeats": repeats, "best_s": min(times), "median_s": statistics.median(times),
            "device": str(jax.devices()[0])}


def torch_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 FLOP/s of an n x n torch.mm with torch's current thread count."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float32)
    b = torch.randn(n, n, generator=g, dtype=torch.float32)
    with torch.no_grad():
        best = min(time_calls(lambda: torch.mm(a, b), repeats, warmup=1))
    return 2.0 * n**3 / best


def write_result(name: str, result: dict[str, Any], results_dir: str | Path | None = None) -> Path:
    """Writes `<results_dir>/<name>.json` (atomically) and prints the JSON as the last stdout line."""
    out_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=True), flush=True)
    return path


def read_last_json(stdout: str) -> dict[str, Any]:
    """The JSON object on the last non-empty line of a benchmark's stdout."""
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    if not lines:
        raise ValueError("benchmark printed nothing")
    return json.loads(lines[-1])
