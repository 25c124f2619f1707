"""Run outputs: metrics.jsonl and the trackers (TensorBoard, W&B), summary.json, and the progress display.

Only process 0 writes. A pipeline run is entered with `current_run(Run.of(config))`: its id (a
fingerprint of the resolved config, so a resumed run keeps it and a changed config gets a new
one), tracker names and hyper-parameters reach every `MetricsWriter` opened inside it. In a
bucket workdir (gs://...) metrics.jsonl and the event files are written to a local scratch copy
(an object cannot be appended to) and uploaded whole at most every UPLOAD_S seconds and when the
writer closes (workdir_fs.LocalMirror). Under CI or without a terminal the tqdm bar becomes plain
log lines, and a stage that has logged nothing for HEARTBEAT_S seconds says it is still running.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time

import jax

from clue_jax import run_identity, trackers, workdir_fs

log = logging.getLogger("clue_jax")
UPLOAD_S = 60.0
HEARTBEAT_S = 30.0


def is_writer() -> bool:
    return jax.process_index() == 0


def use_progress_bar() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


@dataclasses.dataclass(frozen=True)
class Run:
    """What every writer of one pipeline run shares. A Trainer used outside a run logs with id None."""

    id: str | None = None
    tracker_names: tuple[str, ...] = trackers.DEFAULT
    wandb_project: str = trackers.DEFAULT_PROJECT
    hparams: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, config) -> "Run":
        names, project = trackers.configured(config)
        hparams = json.loads(config.to_json_best_effort(sort_keys=True))
        run_id = hashlib.sha256(json.dumps(hparams, sort_keys=True).encode()).hexdigest()[:12]
        return cls(run_id, names, project, hparams)

    def record(self) -> dict:
        """config.json's and summary.json's "run" entry: the id, commit, dirty flag and versions."""
        return {"id": self.id, **run_identity.identity()}


_current = Run()


@contextlib.contextmanager
def current_run(run: Run):
    global _current
    previous, _current = _current, run
    try:
        yield run
    finally:
        _current = previous


class MetricsWriter:
    """One stage's scalars to metrics.jsonl and the run's trackers (TensorBoard under `tensorboard/<name>`).

    Keys are written to metrics.jsonl as given; tracker tags are `train/<key>`, or the key itself when it
    already starts with "eval/". `forget_after(step)` (a resume) drops what a killed run logged past `step`.
    """

    def __init__(self, workdir: str, name: str = "train"):
        self.enabled = is_writer()
        self.name = name
        self._trackers: list[trackers.Tracker] | None = None  # opened at the first write, after a resume
        self._purge_step: int | None = None
        if self.enabled:
            self._mirror = workdir_fs.LocalMirror(workdir, download=("metrics.jsonl",))
            self._uploaded = time.time()
            self.path = os.path.join(self._mirror.local, "metrics.jsonl")
            self._jsonl = trackers.JsonlTracker(self.path, _current.id, name)

    def forget_after(self, step: int) -> None:
        if self.enabled:
            self._jsonl.forget_after(step)
            self._purge_step = step + 1

    def _open(self) -> list[trackers.Tracker]:
        if self._trackers is None:
            run, local = _current, self._mirror.local
            opened = []
            for tracker in run.tracker_names:
                if tracker == "tensorboard":
                    opened.append(trackers.TensorBoardTracker(os.path.join(local, "tensorboard", self.name),
                                                              self._purge_step))
                elif tracker == "wandb":
                    opened.append(trackers.WandbTracker(local, run.wandb_project, run.id, self.name))
            for tracker in opened:
                tracker.write_hparams({"run": run.record(), **run.hparams})
            self._trackers = opened
        return self._trackers

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in metrics.items()}
        self._jsonl.write_scalars(step, record)
        scalars = {_tag(k): v for k, v in record.items() if _is_number(v)}
        for tracker in self._open():
            tracker.write_scalars(step, scalars)
        if workdir_fs.is_remote(self._mirror.remote) and time.time() - self._uploaded >= UPLOAD_S:
            for tracker in self._trackers:
                if hasattr(tracker, "flush"):
                    tracker.flush()
            self._mirror.upload()
            self._uploaded = time.time()

    def close(self) -> None:
        if self.enabled:
            for tracker in self._trackers or []:
                tracker.close()
            self._mirror.close()


def _tag(key: str) -> str:
    return key if key.startswith(("eval/", "train/")) else f"train/{key}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def write_eval_scalars(workdir: str, runs: dict) -> int:
    """Evaluation results, one writer per entry (`tensorboard/eval/<run>/`, stage `eval/<run>` in
    metrics.jsonl), tags `eval/` + the nested keys joined by "/" (e.g. `eval/cloze/company/exact_match`), so
    `tensorboard --logdir WORKDIR/tensorboard` puts every arm's number on one chart. An entry's step is the
    training step it was measured at (its `train.steps`; 0 for an untrained model), and its `train` record
    is no evaluation. Only finite numbers are written; returns how many."""
    if not is_writer():
        return 0
    count = 0
    for run, result in runs.items():
        train = result.get("train") if isinstance(result, dict) else None
        step = int(train.get("steps", 0)) if isinstance(train, dict) else 0
        measured = {k: v for k, v in result.items() if k != "train"} if isinstance(result, dict) else result
        scalars = {f"eval/{tag}": value for tag, value in _numbers(measured)}
        if not scalars:
            continue
        writer = MetricsWriter(workdir, f"eval/{str(run).replace('/', '_')}")
        try:
            writer.forget_after(step - 1)  # a rerun replaces its own line
            writer.write(step, scalars)
        finally:
            writer.close()
        count += len(scalars)
    return count


def write_summary(workdir: str, summary: dict) -> None:
    """summary.json (process 0): the run's record first, paths inside the workdir relative to it."""
    if not is_writer():
        return
    root = os.fspath(workdir_fs.path(workdir)).rstrip("/") + "/"
    stored = {"run": _current.record(), **_relative(summary, root)}
    with workdir_fs.open_write(workdir_fs.join(workdir, "summary.json")) as f:
        json.dump(stored, f, indent=1, sort_keys=True, default=float)


def _relative(value, root: str):
    if isinstance(value, str):
        return value[len(root):] if value.startswith(root) else value
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relative(v, root) for v in value]
    return value


def _numbers(value, prefix: str = ""):
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        if _is_number(value):
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
        _shown_output()
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


_last_output = [time.monotonic()]  # when the clue_jax log or a progress bar last showed something


def _shown_output(record=None) -> bool:
    _last_output[0] = time.monotonic()
    return True  # as a logging filter: let the record through


@contextlib.contextmanager
def heartbeat(what: str, every: float | None = None):
    """While the block runs, logs "<what>: still running (<elapsed>)" whenever nothing has been shown for
    `every` seconds (HEARTBEAT_S): an evaluation or scoring stage is never silent for minutes."""
    every = HEARTBEAT_S if every is None else every
    if not is_writer():
        yield
        return
    started = time.monotonic()
    _shown_output()
    stop = threading.Event()

    def beat():
        while not stop.wait(min(every, 5.0)):
            if time.monotonic() - _last_output[0] >= every:
                log.info("%s: still running (%.0fs)", what, time.monotonic() - started)

    _beating.append(what)
    log.addFilter(_shown_output)  # once, however many heartbeats are nested
    thread = threading.Thread(target=beat, name="clue_jax-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        _beating.remove(what)
        if not _beating:
            log.removeFilter(_shown_output)


_beating: list[str] = []
