"""benchmarks/device_check.sh without a GPU: the script parses, its dry run names every part, each Python
part runs at toy size on the CPU and writes the JSON the summary reads, and the summary tells failures apart."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
sys.path.insert(0, str(ROOT))

from benchmarks import attention_backends, device_check, device_throughput, scoring, teacher_scoring  # noqa: E402


def _script(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_prints_every_part_and_runs_nothing(tmp_path):
    results = tmp_path / "results"
    proc = _script("--dry-run", DEVICE_CHECK_RESULTS=str(results), JAX_PLATFORMS="")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    parts = [line.split("]")[0].split(",")[0].removeprefix("+ [") for line in lines if line.startswith("+ [")]
    assert parts == ["env", "tests", "train_throughput", "attention", "scoring", "teacher_scoring", "summary"]
    text = proc.stdout
    assert "JAX_PLATFORMS=cuda" in text and "--smoke" not in text
    assert "tests/test_attention_backend.py tests/test_remat.py tests/test_scoring.py" in text
    assert "JAX_DEFAULT_MATMUL_PRECISION=highest" in text
    assert "benchmarks/scoring.py --skip-blocks --out" in text
    # every limit fits the deadline: their sum stays within 8 minutes
    limits = [int(line.split("limit ")[1].split("s]")[0]) for line in lines if "limit " in line]
    assert sum(limits) <= 480
    assert not results.exists()  # nothing was run or written


def test_dry_run_smoke_is_the_cpu_at_toy_size(tmp_path):
    proc = _script("--dry-run", "--smoke", DEVICE_CHECK_RESULTS=str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    assert "JAX_PLATFORMS=cpu" in proc.stdout
    for part in ("device_check.py env", "device_throughput.py", "attention_backends.py", "scoring.py --skip",
                 "teacher_scoring.py"):
        (line,) = [line for line in proc.stdout.splitlines() if part in line]
        assert line.endswith("--smoke"), line


def test_fetch_wheels_dry_run_names_every_missing_package_in_one_command():
    proc = _script("--fetch-wheels", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    (command,) = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert "pip download --no-deps --only-binary=:all: --python-version 3.12" in command
    # what the GPU image's python lacks for the parts (its modules are the probe's REQUIRED)
    for package in ("ml-collections==", "pytest==", "pluggy==", "iniconfig==", "pytest-xdist==", "execnet=="):
        assert package in command


def test_unknown_argument_is_one_line_and_exit_2():
    proc = _script("--gpu")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown argument '--gpu' to benchmarks/device_check.sh (--smoke, --dry-run, --fetch-wheels)"]


def test_script_without_a_gpu_stops_after_env_with_exit_3(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    # JAX_PLATFORMS=cpu: no GPU, even on a machine that has one
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "DEVICE_CHECK_PYTHON": sys.executable,
                               "DEVICE_CHECK_RESULTS": str(results), "OUT": str(out)})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "error: JAX sees no GPU (backend cpu" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parts"]["env"]["status"] == "failed" and not summary["ok"]
    assert {p["status"] for name, p in summary["parts"].items() if name != "env"} == {"not run"}
    assert sorted(p.name for p in out.iterdir()) == ["device_check.log", "env.json", "summary.json"]
    assert "env: failed" in (out / "device_check.log").read_text()


def test_env_probe_without_a_gpu_says_so(tmp_path):
    assert device_check.main(["env", "--results-dir", str(tmp_path)]) == 3
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["backend"] == "cpu" and not env["ok"] and "JAX sees no GPU" in env["message"]
    assert device_check.main(["env", "--results-dir", str(tmp_path), "--smoke"]) == 0
    assert json.loads((tmp_path / "env.json").read_text())["ok"]


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_parts_write_sane_json_and_the_summary_reads_them(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    tp = device_throughput.main(["--smoke", "--results-dir", str(results)])
    assert tp == json.loads((results / "train_throughput.json").read_text())
    assert _finite_positive(tp["tokens_per_s"]) and _finite_positive(tp["matmul_peak_flops"])
    assert 0 < tp["mfu"] <= 1
    assert tp["matmul_peak"]["dtype"] == "bfloat16" and tp["compute_dtype"] == "bfloat16"
    assert tp["mfu"] == pytest.approx(tp["tokens_per_s"] * tp["flops_per_token"] / tp["matmul_peak_flops"])
    assert tp["step_compilations"] == 1 and len(tp["step_s_all"]) == tp["timed_steps"]
    assert all(math.isfinite(x) and abs(x - math.log(64)) < 1.0 for x in tp["losses"])  # trained from ln(vocab)

    at = attention_backends.main(["--smoke", "--results-dir", str(results)])
    assert {r["sliding_window"] for r in at["results"]} == {0, 16}  # causal, and a window
    for r in at["results"]:
        assert r["planned_implementation"] == "dense"  # the CPU's plan; "cudnn" on a GPU
        assert math.isfinite(r["planned_vs_xla_max_abs_diff"]) and r["planned_vs_xla_max_abs_diff"] < 0.03
        assert 0 < r["planned_vs_reference_max_abs_diff"] < 0.03  # bf16 against float32: close, not equal
        assert _finite_positive(r["forward_speedup"]) and _finite_positive(r["backward_speedup"])
        assert r["ok"]

    sc = scoring.main(["--skip-blocks", "--smoke", "--out", str(results / "scoring_blocks.json")])
    assert [(r["T"], r["sliding_window"]) for r in sc["results"]] == list(scoring.SKIP_CASES_SMOKE)
    assert all(_finite_positive(r["speedup"]) and r["colsum_max_abs_diff"] < 1e-4 for r in sc["results"])

    ts = teacher_scoring.main(["--smoke", "--results-dir", str(results)])
    assert ts == json.loads((results / "teacher_scoring.json").read_text())
    assert [(r["mode"], r["T"]) for r in ts["results"]] == [("cached", 256), ("live", 256)]
    assert all(_finite_positive(r["median_s"]) and r["xla_temp_bytes"] > 0 for r in ts["results"])
    # the GPU cases, listed: 70B heads, cached and live, at T = 2048 and 8192
    assert {(c["mode"], c["T"], c["num_heads"], c["num_kv_heads"], c["head_dim"]) for c in ts["gpu_cases"]} == {
        (m, t, 64, 8, 128) for m in ("cached", "live") for t in (2048, 8192)}

    assert device_check.main(["env", "--results-dir", str(results), "--smoke"]) == 0
    (results / "tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_a" name="test_skip"><skipped/></testcase></testsuite></testsuites>')
    (results / "device_check.log").write_text("log\n")
    tsv = "env\t0\t1.0\t60\ntests\t1\t2.0\t170\ntrain_throughput\t0\t3.0\t100\nattention\t0\t4.0\t80\n"
    (results / "parts.tsv").write_text(tsv + "scoring\t124\t70.0\t70\nteacher_scoring\t0\t6.0\t70\n")
    assert device_check.main(["summary", "--results-dir", str(results), "--copy-to", str(out)]) == 1
    summary = json.loads((results / "summary.json").read_text())
    status = {name: p["status"] for name, p in summary["parts"].items()}
    assert status == {"env": "ok", "tests": "failed", "train_throughput": "ok", "attention": "ok",
                      "scoring": "timed out", "teacher_scoring": "ok"} and not summary["ok"]
    assert [c["mode"] for c in summary["parts"]["teacher_scoring"]["headline"]["cases"]] == ["cached", "live"]
    assert summary["parts"]["tests"]["headline"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1,
                                                     "failed_tests": ["tests.test_a::test_bad"]}
    assert summary["parts"]["train_throughput"]["headline"]["mfu"] == tp["mfu"]
    copied = sorted(p.name for p in out.iterdir())
    assert copied == sorted(["env.json", "tests.json", "train_throughput.json", "attention.json",
                             "scoring_blocks.json", "teacher_scoring.json", "summary.json", "device_check.log"])
    # all parts ok -> exit 0; a part skipped for lack of time is not ok
    ok_tail = "teacher_scoring\t0\t6.0\t70\n"
    (results / "parts.tsv").write_text(tsv.replace("tests\t1", "tests\t0") + "scoring\t0\t5.0\t70\n" + ok_tail)
    (results / "tests.xml").write_text('<testsuite><testcase classname="t" name="ok"/></testsuite>')
    assert device_check.main(["summary", "--results-dir", str(results)]) == 0
    (results / "parts.tsv").write_text(tsv.replace("tests\t1", "tests\t0") + "scoring\tskipped\t0\t3\n" + ok_tail)
    assert device_check.main(["summary", "--results-dir", str(results)]) == 1
    assert json.loads((results / "summary.json").read_text())["parts"]["scoring"]["status"] == "skipped (no time left)"
