"""Stage caching: a stage reruns only when its inputs change.

Each stage writes into `workdir/stages/<name>/`, and on success a `done.json`
holding a fingerprint of its inputs (its config section and the fingerprints
of the stages it reads) and its JSON result. A rerun with equal inputs
returns the stored result without running. A stage that crashed or was
preempted has no done.json, so it runs again and its trainer resumes from
the checkpoints it left. A stage whose inputs changed is moved aside to
`<name>.previous/` before it reruns, so nothing saved is silently lost.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any, Callable

import jax

log = logging.getLogger("clue_jax")


def fingerprint(inputs: Any) -> str:
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Stages:
    def __init__(self, workdir: str):
        self.root = os.path.join(workdir, "stages")
        self.ran: list[str] = []
        self.reused: list[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def run(self, name: str, inputs: Any, fn: Callable[[str], dict]) -> dict:
        """Runs `fn(stage_dir) -> result` unless a finished run with the same inputs exists.

        The returned dict is the result plus "_fingerprint", which later stages
        put into their own inputs so that a change upstream reruns them too.
        """
        stage_dir = self.path(name)
        done_path = os.path.join(stage_dir, "done.json")
        fp = fingerprint(inputs)
        if os.path.exists(done_path):
            with open(done_path) as f:
                done = json.load(f)
            if done.get("fingerprint") == fp:
                log.info("stage %s: inputs unchanged, reusing %s", name, stage_dir)
                self.reused.append(name)
                return {**done["result"], "_fingerprint": fp}
            if jax.process_index() == 0:
                previous = stage_dir + ".previous"
                shutil.rmtree(previous, ignore_errors=True)
                os.replace(stage_dir, previous)
                log.info("stage %s: inputs changed, previous outputs moved to %s", name, previous)
            _sync(f"{name}:moved")
        os.makedirs(stage_dir, exist_ok=True)
        log.info("stage %s: running", name)
        result = fn(stage_dir)
        if jax.process_index() == 0:
            tmp = done_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"fingerprint": fp, "inputs": inputs, "result": result}, f, indent=1, default=str)
            os.replace(tmp, done_path)
        _sync(f"{name}:done")  # other processes read what process 0 wrote only after this
        self.ran.append(name)
        return {**result, "_fingerprint": fp}


def _sync(tag: str) -> None:
    """Barrier across processes (no-op with one): process 0 writes, the others then read."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)
