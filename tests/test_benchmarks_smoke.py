"""The throughput benchmark runs end to end at toy size and reports a consistent JSON object.

It runs as a subprocess, exactly as a user would start it, so import-time
set-up (JAX_PLATFORMS, OMP_WAIT_POLICY, sys.path) is exercised too.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"

NUMBERS = (
    "clue_jax_tokens_per_s", "torch_tokens_per_s", "ratio", "compile_s", "first_step_s", "clue_jax_mfu",
    "torch_mfu", "peak_flops", "peak_flops_jax", "peak_flops_torch", "clue_jax_cpu_s_per_step",
    "torch_cpu_s_per_step", "flops_per_token", "target_ratio", "matmul_floor_s", "ratio_ceiling",
)


def _run_smoke(tmp_path: Path) -> tuple[dict, dict]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--profile", "--results-dir", str(tmp_path)],
        cwd=tmp_path,  # not the repo root: the script must find clue_jax and benchmarks by itself
        env=dict(os.environ),
        capture_output=True,
        check=False,  # the return code is asserted below, with stderr in the message
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])  # the JSON object is the last stdout line
    written = json.loads((tmp_path / "train_throughput_smoke.json").read_text())
    return printed, written


def test_train_throughput_smoke(tmp_path):
    printed, written = _run_smoke(tmp_path)
    assert printed == written
    r = printed
    assert r["smoke"] is True and r["benchmark"] == "train_throughput"
    for key in NUMBERS:
        assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), key
        assert r[key] >= 0, key
    for key in ("clue_jax_tokens_per_s", "torch_tokens_per_s", "peak_flops", "clue_jax_mfu", "torch_mfu"):
        assert r[key] > 0, key
    assert r["ratio"] == r["clue_jax_tokens_per_s"] / r["torch_tokens_per_s"]
    assert r["meets_target"] == (r["ratio"] >= r["target_ratio"])
    assert r["peak_flops"] == max(r["peak_flops_jax"], r["peak_flops_torch"])
    # The same model on both sides, the same number of timed steps, and no recompilation.
    assert r["n_params"] == r["torch_n_params"]
    assert r["timed_steps"] == len(r["clue_jax_step_s_all"]) * r["steps_per_round"] == 2
    assert len(r["clue_jax_step_s_all"]) == len(r["torch_step_s_all"])
    assert r["clue_jax_step_compilations"] == 1
    # Both sides actually trained: finite losses near ln(vocab) at the start.
    m = r["model"]
    for side in ("clue_jax_losses", "torch_losses"):
        losses = r[side]
        assert losses and all(math.isfinite(x) for x in losses), side
        assert abs(losses[0] - math.log(m["vocab"])) < 1.0, side
    # PaLM FLOPs: 6 N + 12 L d T, N without the position table.
    n = r["n_params"] - m["seq"] * m["d_model"]
    assert r["flops_per_token"] == 6 * n + 12 * m["layers"] * m["d_model"] * m["seq"]
    # The matmul floor times exactly the step's matmul FLOPs: 6 x (matrices, the tied
    # embedding once) + attention's 12 L d T, per token; each matmul counts at its best round.
    d, f, layers = m["d_model"], m["mlp"], m["layers"]
    matrices = 4 * layers * d * d + 2 * layers * d * f + m["vocab"] * d
    tokens = m["batch"] * m["seq"]
    assert r["matmul_floor_flops"] == tokens * (6 * matrices + 12 * layers * d * m["seq"])
    assert 0 < r["matmul_floor_s"] <= min(r["matmul_floor_s_per_round"])
    assert r["ratio_ceiling"] == r["torch_step_s"] / r["matmul_floor_s"]
    # --profile: the traced step's wall time splits into matmuls, other ops and the rest.
    prof = r["clue_jax_step_profile"]
    assert prof["matmul_s"] > 0 and prof["other_s"] > 0 and prof["rest_s"] >= 0
    assert math.isclose(prof["matmul_s"] + prof["other_s"] + prof["rest_s"], prof["window_s"], rel_tol=1e-6)
    assert prof["top_ops_thread_s"]["matmul"] > 0


def test_decode_benchmark_smoke(tmp_path):
    """benchmarks/decode.py at toy size: cached and uncached decoding agree and the ratio is what it reports."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--smoke", "--results-dir",
                           str(tmp_path)], cwd=tmp_path, env=dict(os.environ), capture_output=True, check=False,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r == json.loads((tmp_path / "decode_smoke.json").read_text())
    assert r["identical_tokens"] and set(r["models"]) == {"quickstart", "llama3"}
    for m in r["models"].values():
        assert m["mismatched_tokens"] == 0 and m["distinct_tokens"] > 1
        assert m["cached_s"] > 0 and m["ratio"] == m["uncached_s"] / m["cached_s"]
        assert m["matmul_flops"]["cached"] < m["matmul_flops"]["uncached"]
    assert r["meets_target"] == all(m["ratio"] >= r["target_ratio"] for m in r["models"].values())
