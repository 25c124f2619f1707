"""The Python side of `benchmarks/device_check.sh`: the environment probe and the summary.

    python benchmarks/device_check.py env --results-dir D [--smoke]
        Writes D/env.json (JAX's backend, devices, versions, missing modules).
        Exit 3 when JAX sees no GPU (unless --smoke), 4 when a module the
        parts import is missing: every later part would measure nothing.
    python benchmarks/device_check.py summary --results-dir D [--copy-to OUT]
        Reads D/parts.tsv (one line per part the script ran: name, exit code,
        seconds, limit), each part's JSON and D/tests.xml (pytest's JUnit
        report), writes D/tests.json and D/summary.json, copies the JSON files
        and the log to OUT. Exit 1 when a part failed, timed out or was skipped.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "")  # the default backend is the point
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

# What the parts import, beyond the standard library (the GPU image lacks ml_collections and pytest with its
# plugins: `device_check.sh --fetch-wheels` fetches them as wheels). Not tensorboardX: without it the script
# leaves out the one test that calls Trainer.run.
REQUIRED = ("jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "etils", "numpy", "scipy", "pytest",
            "pluggy", "iniconfig")
# part name -> the JSON file it writes, or None (tests: the summary makes tests.json from tests.xml)
PARTS = {"env": "env.json", "tests": None, "train_throughput": "train_throughput.json",
         "attention": "attention.json", "scoring": "scoring_blocks.json", "teacher_scoring": "teacher_scoring.json"}
LOG = "device_check.log"


def _missing_modules() -> list[str]:
    missing = []
    for name in REQUIRED:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def _below_pins() -> list[str]:
    """Installed distributions older than pyproject.toml's lower bounds (the GPU image brings its own): a lead
    for a failing part, not a failure."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    found = []
    for req in map(Requirement, deps["dependencies"]):
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # what the parts need is in missing_modules
        if not req.specifier.contains(version, prereleases=True):
            found.append(f"{req.name} {version} (pyproject: {req.specifier})")
    return found


def probe(results_dir: Path, smoke: bool) -> int:
    """Writes env.json and says, in one line, why the check cannot go on (or that it can)."""
    env = {"python": sys.executable, "machine": common.machine_info(), "smoke": smoke,
           "jax_platforms": os.environ.get("JAX_PLATFORMS", ""), "missing_modules": _missing_modules(),
           "below_pins": _below_pins()}
    code, message = 0, ""
    try:
        import jax

        env.update(jax=jax.__version__, backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
                   device_kind=jax.devices()[0].device_kind)
        for name in ("flax", "optax", "orbax.checkpoint"):
            if name not in env["missing_modules"]:
                env[name] = getattr(__import__(name, fromlist=["__version__"]), "__version__", "?")
    except Exception as e:  # noqa: BLE001 - no backend at all is the finding to report
        env.update(backend=None, jax_error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:500]}")
    if env["backend"] != "gpu" and not smoke:
        code = 3
        message = (f"JAX sees no GPU (backend {env['backend']}, JAX_PLATFORMS={env['jax_platforms']!r}, "
                   f"{env.get('jax_error') or env.get('devices')}): run this with a python whose jax has the "
                   "CUDA plugin (the H200 image's python3 has jax-cuda13-plugin), and check nvidia-smi")
    elif env["missing_modules"]:
        code = 4
        message = (f"missing modules {', '.join(env['missing_modules'])}: where a registry is reachable run "
                   "`bash benchmarks/device_check.sh --fetch-wheels` and carry .whl to the device machine")
    env.update(ok=code == 0, message=message)
    common.write_result("env", env, results_dir)
    if message:
        print(f"error: {message}", file=sys.stderr)
    return code


def junit_counts(xml_path: Path) -> dict:
    """pytest's JUnit XML -> counts and the ids of the tests that failed or errored."""
    root = ET.parse(xml_path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "error" in kinds:
            counts["errors"] += 1
            failed.append(name)
        elif "failure" in kinds:
            counts["failed"] += 1
            failed.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failed_tests": failed, "total": sum(counts.values())}


def _parts_run(results_dir: Path) -> dict[str, dict]:
    """parts.tsv as {name: {"rc", "seconds", "limit_s"}}; rc is null for a part skipped for lack of time."""
    runs = {}
    path = results_dir / "parts.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, seconds, limit = line.split("\t")
        runs[name] = {"rc": None if rc == "skipped" else int(rc), "seconds": float(seconds), "limit_s": int(limit)}
    return runs


def _headline(name: str, data: dict) -> dict:
    """The few numbers of a part worth reading first."""
    if name == "env":
        return {k: data.get(k) for k in ("backend", "device_kind", "jax", "missing_modules", "below_pins", "message")}
    if name == "tests":
        return {k: data[k] for k in ("passed", "failed", "errors", "skipped", "failed_tests")}
    if name == "train_throughput":
        return {k: data.get(k) for k in ("tokens_per_s", "mfu", "matmul_peak_flops", "step_s", "compile_s")}
    if name == "attention":
        keys = ("seq_len", "sliding_window", "planned_implementation", "planned_vs_xla_max_abs_diff",
                "forward_speedup", "backward_speedup", "ok")
        return {"ok": data.get("ok"), "cases": [{k: r.get(k) for k in keys} for r in data.get("results", [])]}
    if name == "scoring":
        keys = ("T", "sliding_window", "speedup", "colsum_max_abs_diff")
        return {"cases": [{k: r.get(k) for k in keys} for r in data.get("results", [])]}
    if name == "teacher_scoring":
        keys = ("mode", "T", "median_s", "xla_temp_bytes", "peak_bytes_in_use")
        return {"cases": [{k: r.get(k) for k in keys} for r in data.get("results", [])],
                "of_gpu_cases": len(data.get("gpu_cases", []))}
    return {}


def summarize(results_dir: Path, copy_to: Path | None) -> int:
    runs = _parts_run(results_dir)
    if (results_dir / "tests.xml").exists():
        (results_dir / "tests.json").write_text(json.dumps(junit_counts(results_dir / "tests.xml"), indent=2) + "\n")
    parts, all_ok = {}, True
    for name, file in PARTS.items():
        run = runs.get(name)
        path = results_dir / (file or "tests.json")
        data = json.loads(path.read_text()) if run and run["rc"] is not None and path.exists() else None
        if run is None:
            status = "not run"
        elif run["rc"] is None:
            status = "skipped (no time left)"
        elif run["rc"] in (124, 137):
            status = "timed out"
        elif run["rc"] or data is None:
            status = "failed"
        else:
            status = "ok"
        all_ok &= status == "ok"
        parts[name] = {"status": status, **(run or {}), "file": path.name if data is not None else None,
                       **({"headline": _headline(name, data)} if data is not None else {})}
    summary = {"ok": all_ok, "parts": parts, "results_dir": str(results_dir), "machine": common.machine_info()}
    common.write_result("summary", summary, results_dir)
    lines = [f"{name}: {part['status']}" + (f" ({part['seconds']:.0f} s of {part['limit_s']} s)"
                                             if part.get("rc") is not None else "") for name, part in parts.items()]
    print("\n".join(lines), file=sys.stderr, flush=True)
    with open(results_dir / LOG, "a") as log:  # before the copy below, so $OUT's log has them too
        log.write("\n".join(lines) + "\n")
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        for name in [f or "tests.json" for f in PARTS.values()] + ["summary.json", LOG]:
            if (results_dir / name).exists():
                shutil.copy2(results_dir / name, copy_to / name)
    return 0 if all_ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("env", "summary"))
    parser.add_argument("--results-dir", required=True, type=Path)
    parser.add_argument("--smoke", action="store_true", help="env: a CPU is fine (tiny sizes)")
    parser.add_argument("--copy-to", type=Path, default=None, help="summary: also copy the results here ($OUT)")
    args = parser.parse_args(argv)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.command == "env":
        return probe(args.results_dir, args.smoke)
    return summarize(args.results_dir, args.copy_to)


if __name__ == "__main__":
    sys.exit(main())
