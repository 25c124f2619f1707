"""Where a jitted step's wall time goes on the CPU: matmuls, other ops, or neither.

`jax.profiler` records every XLA op the CPU runtime executes, on whichever
thread ran it. An op that contains a dot (a YNNPACK dot fusion, a plain dot,
or a fusion around one) is a matmul; everything else (elementwise and
reduction fusions, copies, transposes) is "other". Because one op can run
on several threads at once, the split is by wall time: the union of the
intervals in which some matmul runs, then the time in which only other ops
run, then the rest of the window (dispatch and idle time).

Used by `train_throughput.py --profile`; the numbers come from the run that
prints them.
"""
from __future__ import annotations

import collections
import glob
import re
import tempfile

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def instruction_kinds(hlo_text: str) -> dict[str, bool]:
    """Every instruction name of compiled HLO -> whether it is, or calls a computation with, a dot."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and not line.startswith(" "):
            current = head.group(1)
            bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
    has_dot = {name for name, body in bodies.items() if any(" dot(" in b for b in body)}
    kinds = {}
    for body in bodies.values():
        for line in body:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            called = _CALLS.search(line)
            kinds[m.group(1)] = m.group(2) == "dot" or bool(called and called.group(1) in has_dot)
    return kinds


def _union(intervals: list[tuple[int, int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _length(intervals: list[list[int]]) -> int:
    return sum(end - start for start, end in intervals)


def profile_step(run_steps, hlo_text: str, steps: int) -> dict:
    """Profiles `run_steps(steps)` (which must block at its end) and splits its wall time per step.

    Returns window_s, matmul_s, other_s, rest_s (all per step) and the ten
    op kinds that ran longest (summed over threads, per step).
    """
    is_dot = instruction_kinds(hlo_text)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        run_steps(steps)
        jax.profiler.stop_trace()
        files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
        profile = jax.profiler.ProfileData.from_file(files[-1])
    matmul, other, per_kind = [], [], collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name not in is_dot:
                    continue  # Python frames and runtime bookkeeping, not an op of the step
                interval = (ev.start_ns, ev.start_ns + ev.duration_ns)
                (matmul if is_dot[ev.name] else other).append(interval)
                kind = "matmul" if is_dot[ev.name] else re.sub(r"\.\d+$", "", ev.name)
                per_kind[kind] += ev.duration_ns
    if not matmul:
        raise RuntimeError("the profile holds no matmul of the step: was it traced on the CPU?")
    everything = _union(matmul + other)
    window = everything[-1][1] - everything[0][0]
    matmul_ns = _length(_union(matmul))
    busy_ns = _length(everything)
    return {
        "window_s": window / steps / 1e9,
        "matmul_s": matmul_ns / steps / 1e9,
        "other_s": (busy_ns - matmul_ns) / steps / 1e9,
        "rest_s": (window - busy_ns) / steps / 1e9,
        "top_ops_thread_s": {k: v / steps / 1e9 for k, v in per_kind.most_common(10)},
    }
