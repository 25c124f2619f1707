"""benchmarks/compile_depth.py at tiny widths: a 32-layer step compiles about as fast as a 4-layer one.

Bound 2, not the benchmark's 1.5: at these widths one compile takes a few
seconds, most of it fixed cost, and on the shared 2-core test machine a single
unlucky compile can be ~1.5x slower than its twin. An unrolled stack would
fail by far (it compiled 8x the layer bodies; several times slower, not 2x).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_compile_time_does_not_grow_with_depth(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_depth.py"), "--smoke", "--repeats", "1",
                           "--results-dir", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "compile_depth_smoke.json").read_text())
    assert (printed["deep_layers"], printed["shallow_layers"]) == (32, 4)
    assert printed["ratio"] <= 2.0, printed
