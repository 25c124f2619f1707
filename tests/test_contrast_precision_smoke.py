"""benchmarks/contrast_precision.py: the bf16-vs-float32 contrast comparison runs on tiny random teachers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import contrast_precision  # noqa: E402


def test_smoke_run_reports_rank_stability(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "contrast_precision.py"), "--smoke",
                           "--results-dir", str(tmp_path)], cwd=tmp_path, env=dict(os.environ),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r == json.loads((tmp_path / "contrast_precision_smoke.json").read_text())
    assert r["documents"] == 6 and r["top_k"] == 10
    assert -1.0 <= r["spearman"]["min"] <= r["spearman"]["p5"] <= r["spearman"]["mean"] <= 1.0
    assert r["spearman"]["mean"] > 0.9  # bf16 teachers rank nearly as float32 ones do
    assert 0.0 < max(r["score_max_abs_diff"].values()) < 1e-2  # bf16 really scored differently, a little
    for key in ("dropped_set_changed_fraction", "dropped_set_changed_expected", "rank_changed_fraction"):
        assert 0.0 <= r[key] <= 1.0, key


def test_compare_is_exact_against_itself_and_sees_a_reordering():
    teachers, docs, drop_cfg, clues, _ = contrast_precision.smoke_setup()
    d, _ = contrast_precision.contrast(teachers, docs, "float32", clues["query_block"], clues["score_batch"])
    same = contrast_precision.compare(d, d.copy(), docs, drop_cfg, top_k=5, draws=4)
    assert np.allclose(list(same["spearman"].values()), 1.0) and same["top_k_overlap"]["min"] == 1.0
    assert same["dropped_set_changed_fraction"] == same["dropped_set_changed_expected"] == 0.0
    flipped = contrast_precision.compare(d, -d, docs, drop_cfg, top_k=5, draws=4)  # the opposite ranking
    assert np.isclose(flipped["spearman"]["mean"], -1.0) and flipped["top_k_overlap"]["mean"] < 0.5
    assert flipped["dropped_set_changed_fraction"] > 0.5
