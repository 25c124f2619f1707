"""The extraction report's figures: dev exact match against lambda, and against fine-tuning steps."""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from clue_jax import workdir_fs


def plot_sweep(sweeps: Mapping, path: str) -> None:
    """Dev exact match against lambda: one panel per fine-tuning kind, a line per (decode|rank, mode), mean ± std
    over seeds. `sweeps[kind][seed][method][mode][lambda] = dev EM`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = list(sweeps)
    fig = Figure(figsize=(5 * max(len(kinds), 1), 4), dpi=100)
    FigureCanvasAgg(fig)
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(1, max(len(kinds), 1), i + 1)
        per_seed = list(sweeps[kind].values())
        for method in ("decode", "rank"):
            modes = sorted({m for s in per_seed for m in s.get(method, {})})
            for mode in modes:
                lams = sorted({float(l) for s in per_seed for l in s[method].get(mode, {})})
                ys = np.array([[s[method][mode].get(str(l), s[method][mode].get(repr(l), math.nan)) for l in lams]
                               for s in per_seed if mode in s.get(method, {})], dtype=np.float64)
                mean = np.nanmean(ys, axis=0)
                ax.plot(lams, mean, marker="o", ms=3, ls="-" if method == "decode" else "--", label=f"{method}/{mode}")
                if len(ys) > 1:
                    sd = np.nanstd(ys, axis=0, ddof=1)
                    ax.fill_between(lams, mean - sd, mean + sd, alpha=0.15)
        ax.set_xlabel("lambda (weight of the fine-tuned model)")
        ax.set_ylabel("dev exact match")
        ax.set_title(f"{kind} fine-tuning + base")
        ax.legend(fontsize=7)
    fig.tight_layout()
    workdir_fs.savefig(fig, path)


def plot_steps(steps_sweep: Mapping, base_em: float, path: str) -> None:
    """Dev and test exact match of vanilla fine-tuning against its length (mean ± std over seeds), the base model
    as a line: where fine-tuning starts to hurt, if it does. `steps_sweep[seed][steps] = {"dev_exact_match",
    "exact_match"}`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = sorted({int(n) for per in steps_sweep.values() for n in per})
    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, label in (("dev_exact_match", "dev"), ("exact_match", "test")):
        ys = np.array([[per.get(str(n), {}).get(key, math.nan) for n in steps] for per in steps_sweep.values()],
                      dtype=np.float64)
        mean = np.nanmean(ys, axis=0)
        ax.plot(steps, mean, marker="o", ms=3, label=f"vanilla, {label}")
        if len(ys) > 1:
            sd = np.nanstd(ys, axis=0, ddof=1)
            ax.fill_between(steps, mean - sd, mean + sd, alpha=0.15)
    if math.isfinite(base_em):
        ax.axhline(base_em, color="grey", ls="--", lw=0.8, label="base, test")
    ax.set_xscale("log")
    ax.set_xlabel("fine-tuning steps")
    ax.set_ylabel("exact match (zero-shot decoding)")
    ax.set_title("Vanilla fine-tuning: EM against steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    workdir_fs.savefig(fig, path)
