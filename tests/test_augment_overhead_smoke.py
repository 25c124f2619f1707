"""benchmarks/augment_overhead.py runs end to end at tiny size and reports its ratios."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import read_last_json  # noqa: E402


def test_augment_overhead_smoke(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "benchmarks/augment_overhead.py", "--smoke", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_last_json(proc.stdout)
    for key in ("plain_step_s", "cached_step_s", "live_step_s", "cached_over_plain", "live_over_plain"):
        assert result[key] > 0
    assert abs(result["cached_over_plain"] - result["cached_step_s"] / result["plain_step_s"]) < 1e-9
    assert (tmp_path / "augment_overhead_smoke.json").exists()
