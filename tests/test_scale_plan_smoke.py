"""benchmarks/scale_plan.py runs end to end at tiny shapes and prints its JSON contract on the last line.

A subprocess, as a user starts it: the script sets the fake device count before jax is imported.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("name", "devices", "mesh", "argument_bytes_per_device", "output_bytes_per_device", "temp_bytes_per_device",
        "flops_per_step")


def test_scale_plan_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale_plan.py"), "--smoke",
                           "--results-dir", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "scale_plan_smoke.json").read_text())
    cases = {c["name"]: c for c in printed["cases"]}
    assert sorted(cases) == ["llama3_70b_8b_scoring", "llama3_8b_full_train", "llama3_8b_lora16_live_train",
                            "llama3_8b_lora16_train"]
    for case in cases.values():
        assert all(k in case for k in KEYS)
        assert case["devices"] == 8 and case["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
        assert case["argument_bytes_per_device"] > 0 and case["flops_per_step"] > 0
        gathered = case["largest_collectives"]["all-gather"]  # every case gathers fsdp-sharded weights
        assert gathered is not None and gathered["bytes"] > 0
        assert set(case["collectives"][0]) == {"op", "dtype", "shape", "bytes", "count"}
    lora, full, live = cases["llama3_8b_lora16_train"], cases["llama3_8b_full_train"], cases["llama3_8b_lora16_live_train"]
    assert lora["remat"] == full["remat"] == live["remat"] == "full"
    assert live["flops_per_step"] > lora["flops_per_step"]  # the teachers' scoring runs inside the live step
    assert 0 < lora["trainable_params"] < full["trainable_params"]  # adapters only
    # every device holds a 1/8 shard of the full model's bf16 weights and its AdamW moments, at least
    assert full["argument_bytes_per_device"] >= 3 * 2 * full["trainable_params"] / 8
