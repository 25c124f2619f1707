"""Run outputs: metrics.jsonl, TensorBoard events (training and evaluation) and the progress display.

Only process 0 writes. In a bucket workdir (gs://...) both are written to a
local scratch copy (an object cannot be appended to) and uploaded whole at
most every UPLOAD_S seconds and when the writer closes (workdir_fs.LocalMirror).
Under CI or without a terminal the tqdm bar becomes
plain log lines, so logs stay readable in files.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import jax

from clue_jax import workdir_fs

log = logging.getLogger("clue_jax")
UPLOAD_S = 60.0


def is_writer() -> bool:
    return jax.process_index() == 0


def use_progress_bar() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class MetricsWriter:
    """Appends one JSON object per logged step; mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, name: str = "train"):
        self.enabled = is_writer()
        self.name = name
        self._tb = self._mirror = None
        if self.enabled:
            self._mirror = workdir_fs.LocalMirror(workdir, download=("metrics.jsonl",))
            self._uploaded = time.time()
            self.path = os.path.join(self._mirror.local, "metrics.jsonl")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self._mirror.local, "tensorboard", name))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"stage": self.name, "step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        if workdir_fs.is_remote(self._mirror.remote) and time.time() - self._uploaded >= UPLOAD_S:
            self._tb.flush()
            self._mirror.upload()
            self._uploaded = time.time()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._mirror.close()


def write_eval_scalars(workdir: str, runs: dict, step: int = 0) -> int:
    """Evaluation results as TensorBoard scalars, one run per entry: `tensorboard/eval/<run>/`, tags the
    nested keys joined by "/" (e.g. `cloze/company/exact_match`), so `tensorboard --logdir WORKDIR/tensorboard`
    puts every arm's number on one chart. Only finite numbers are written; returns how many."""
    if not is_writer():
        return 0
    from tensorboardX import SummaryWriter

    count = 0
    with workdir_fs.local_dir_for(workdir_fs.join(workdir, "tensorboard", "eval")) as local:
        for run, result in runs.items():
            scalars = dict(_numbers(result))
            if not scalars:
                continue
            with SummaryWriter(os.path.join(local, str(run).replace("/", "_"))) as tb:
                for tag, value in scalars.items():
                    tb.add_scalar(tag, value, step)
            count += len(scalars)
    return count


def _numbers(value, prefix: str = ""):
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield prefix.rstrip("/"), float(value)
        return
    for key, sub in items:
        yield from _numbers(sub, f"{prefix}{key}/")


def _plain(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


class Progress:
    """tqdm bar on a terminal, log lines every `every` steps elsewhere."""

    def __init__(self, total: int, start: int, desc: str, every: int):
        self.total, self.every, self.desc = total, max(1, every), desc
        self.start_time = time.time()
        self.start_step = start
        self.bar = None
        if is_writer() and use_progress_bar():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)

    def update(self, step: int, metrics: dict) -> None:
        if not is_writer():
            return
        shown = {k: metrics[k] for k in ("loss", "tokens_per_s") if k in metrics}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
        elif step % self.every == 0 or step == self.total:
            done = step - self.start_step
            elapsed = time.time() - self.start_time
            eta = elapsed / done * (self.total - step) if done else float("nan")
            text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            log.info("%s step %d/%d %s eta=%.0fs", self.desc, step, self.total, text, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
