"""Stage caching: a stage reruns only when its inputs change.

Each stage writes into `workdir/stages/<name>/`. When it starts it writes
`started.json` with a fingerprint of its inputs (its config section and the
fingerprints of the stages it reads); on success `done.json` with the same
fingerprint and its JSON result. A rerun with equal inputs returns the stored
result without running; an unfinished stage with equal inputs runs again in
place (its trainer resumes from the checkpoints it left). A stage whose inputs
changed, finished or not, is moved aside to `<name>.previous-<n>/` (n = 1, 2,
... never reused) before it reruns, so nothing saved is lost.

done.json also lists the size of every file the stage wrote (its checkpoints
aside). A finished stage whose files are missing or changed in size is
damaged: it is moved aside to `<name>.damaged-<n>/` with one warning and runs
again. Damage that keeps the sizes (flipped bits in saved arrays) shows when a
later stage reads the model: the store's checksums refuse it (DamagedModel),
the stage holding it is moved aside the same way, and `rerun_damaged` runs the
pipeline again, which reuses every sound stage and recomputes the moved one.
The result and the files are written before done.json (one atomic write), so
an interrupted stage is either finished with its true result or unfinished
and resumed.

Result entries that are paths inside the workdir are stored relative to it
(listed under "workdir_paths" in done.json) and resolved when read, so a moved
workdir keeps working. With several processes, process 0 makes every decision
(reuse / move aside / run) and broadcasts it, so no start-up order can split
the processes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any, Callable

import jax
import numpy as np

from clue_jax import workdir_fs
from clue_jax.config_check import read_json, workdir_path
from clue_jax.errors import UserInputError
from clue_jax.models.store import DamagedModel
from clue_jax.train import logging_utils

log = logging.getLogger("clue_jax")

_RUN, _REUSE, _RESUME, _FAILED = 0, 1, 2, 3  # what process 0 decided, as broadcast
_NOT_OUTPUTS = ("checkpoints", "checkpoints.damaged", "started.json", "done.json")  # top-level, not checked


class StageDamaged(UserInputError):
    """A finished stage's output was damaged when a later stage read it; the stage has been moved aside."""


def rerun_damaged(run: Callable[[], Any], attempts: int = 3) -> Any:
    """`run()` (a whole pipeline), again after each StageDamaged: sound stages are reused, moved ones recomputed."""
    for attempt in range(attempts):
        try:
            return run()
        except StageDamaged as err:
            if attempt == attempts - 1:
                raise StageDamaged(f"{err}; rerun the same command to recompute it") from None
            log.warning("%s; running the pipeline again", err)


def fingerprint(inputs: Any) -> str:
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Stages:
    def __init__(self, workdir: str):
        self.workdir = workdir_path(workdir)
        self.root = self.workdir / "stages"
        self.ran: list[str] = []
        self.reused: list[str] = []
        self.planned: int | None = None  # stages this run will visit, once the pipeline declares it
        self._drift_warned = False

    def expect(self, planned: int) -> None:
        """Declares how many stages this run visits (reused ones included), so each logs `stage k/n`.

        A pipeline may call it again when a count becomes known mid-run (e.g. once its data are encoded).
        """
        if self.planned is not None and int(planned) != self.planned:
            log.info("stages: this run now visits %d stages (planned %d before)", int(planned), self.planned)
        self.planned = int(planned)

    def _label(self, number: int, name: str) -> str:
        if self.planned is None:
            return f"stage {number}: {name}"
        if number > self.planned and not self._drift_warned:
            self._drift_warned = True
            log.warning("stage %d/%d: %s: more stages than the %d planned (the plan drifted); the run goes on",
                        number, self.planned, name, self.planned)
        return f"stage {number}/{self.planned}: {name}"

    def path(self, name: str) -> str:
        return str(self.root / name)

    def run(self, name: str, inputs: Any, fn: Callable[[str], dict]) -> dict:
        """Runs `fn(stage_dir) -> result` unless a finished run with the same inputs exists.

        The returned dict is the result plus "_fingerprint", which later stages
        put into their own inputs so that a change upstream reruns them too.
        """
        stage_dir = self.root / name
        fp = fingerprint(inputs)
        decision = _decide_once(lambda: self._decide(name, fp))
        label = self._label(len(self.ran) + len(self.reused) + 1, name)
        if decision == _REUSE:
            log.info("%s: inputs unchanged, reusing %s", label, stage_dir)
            self.reused.append(name)
            return {**self._read_result(name), "_fingerprint": fp}
        log.info("%s: %s", label, "resuming (same inputs)" if decision == _RESUME else "running")
        try:
            with logging_utils.heartbeat(label):
                result = fn(str(stage_dir))
        except DamagedModel as err:
            raise self._damaged_input(name, err) from None
        if jax.process_index() == 0:
            _write_json(stage_dir / "done.json", {"fingerprint": fp, "inputs": inputs, **self._record(result),
                                                  "files": _file_sizes(stage_dir)})
        _sync(f"{name}:done")  # other processes read what process 0 wrote only after this
        self.ran.append(name)
        return {**result, "_fingerprint": fp}

    # ------------------------------------------------------------ process 0
    def _decide(self, name: str, fp: str) -> int:
        """Reuse, resume or (after moving old outputs aside) run afresh; prepares the stage directory."""
        stage_dir = self.root / name
        done = stage_dir / "done.json"
        if done.exists():
            record = _read_record(done, stage_dir)
            if record.get("fingerprint") != fp or not isinstance(record.get("result"), dict):
                self._move_aside(name, "inputs changed")
            elif damage := _damage(stage_dir, record.get("files")):
                self._move_aside(name, f"its output is damaged ({damage}), running it again", "damaged")
            else:
                return _REUSE
        elif stage_dir.exists() and any(stage_dir.iterdir()):
            started = stage_dir / "started.json"
            try:
                same = started.exists() and read_json(str(started), "stage start record").get("fingerprint") == fp
            except UserInputError as err:
                log.warning("stage %s: %s", name, err)
                same = False
            if same:
                return _RESUME
            self._move_aside(name, "unfinished under other inputs")
        stage_dir.mkdir(parents=True, exist_ok=True)
        _write_json(stage_dir / "started.json", {"fingerprint": fp})
        return _RUN

    def _move_aside(self, name: str, why: str, kind: str = "previous") -> str:
        taken = [int(m.group(1)) for p in self.root.glob(f"{name}.{kind}-*")
                 if (m := re.fullmatch(re.escape(f"{name}.{kind}-") + r"(\d+)", p.name))]
        target = self.root / f"{name}.{kind}-{max(taken, default=0) + 1}"
        workdir_fs.rename(self.root / name, target)
        log.warning("stage %s: %s; its outputs moved to %s (%d earlier copies kept beside it)",
                    name, why, target, len(taken))
        return str(target)

    def _damaged_input(self, name: str, err: DamagedModel) -> UserInputError:
        """The stage of this workdir holding a damaged model is moved aside (process 0); StageDamaged says so.

        A damaged model outside the stages (one the config names) stays where it is: the user's to replace.
        """
        root, damaged = os.fspath(self.root).rstrip("/") + "/", os.fspath(workdir_fs.path(err.directory))
        owner = damaged.removeprefix(root).split("/")[0]
        if not damaged.startswith(root) or not (self.root / owner).exists():
            return err
        target = f"{owner}.damaged-<n>"  # the number process 0 picked
        if jax.process_index() == 0:
            target = self._move_aside(owner, "a saved model in it is damaged", "damaged")
        _sync(f"{name}:damaged")
        return StageDamaged(f"stage {name}: {err}; stage {owner} was moved aside to {target}")

    # ------------------------------------------------------------ paths in records
    def _record(self, result: dict) -> dict:
        """done.json's result with paths inside the workdir made relative to it."""
        prefix = str(self.workdir).rstrip("/") + "/"
        relative = sorted(k for k, v in result.items() if isinstance(v, str) and v.startswith(prefix))
        stored = {k: (v[len(prefix):] if k in relative else v) for k, v in result.items()}
        return {"result": stored, "workdir_paths": relative}

    def _read_result(self, name: str) -> dict:
        stage_dir = self.root / name
        record = _read_record(stage_dir / "done.json", stage_dir)
        result = dict(record["result"])
        for key in record.get("workdir_paths", []):
            result[key] = str(self.workdir / result[key])
        return result


def _read_record(path, stage_dir) -> dict:
    try:
        record = read_json(str(path), "stage record")
    except UserInputError as err:
        raise UserInputError(f"{err}; delete {stage_dir} to run that stage again") from None
    if not isinstance(record, dict):
        raise UserInputError(f"stage record {path} is not a JSON object; delete {stage_dir} to run that stage again")
    return record


def _file_sizes(stage_dir) -> dict[str, int]:
    """Size of every file the stage wrote (paths relative to it, "/"-separated), its checkpoints and records aside."""
    without_scheme = lambda p: os.fspath(p).split("://", 1)[-1].rstrip("/")  # a bucket's walk may drop gs://
    base = without_scheme(stage_dir)
    sizes = {}
    for root, _, files in stage_dir.walk():
        rel_root = without_scheme(root)[len(base):].strip("/")
        if rel_root.split("/")[0] in _NOT_OUTPUTS:
            continue
        for name in files:
            rel = f"{rel_root}/{name}" if rel_root else name
            if rel not in _NOT_OUTPUTS:
                sizes[rel] = (stage_dir / rel).stat().length
    return sizes


def _damage(stage_dir, files: dict | None) -> str:
    """What is missing or resized among the files done.json lists ("" when all are as written)."""
    for rel, size in sorted((files or {}).items()):
        path = stage_dir / rel
        if not path.exists():
            return f"{rel} is missing"
        if path.stat().length != size:
            return f"{rel} has {path.stat().length} bytes, not the {size} written"
    return ""


def _write_json(path, value) -> None:
    workdir_fs.write_text(path, json.dumps(value, indent=1, default=str))


def _decide_once(decide: Callable[[], int]) -> int:
    """Process 0 runs `decide` and every process gets its answer (an error on 0 stops all)."""
    if jax.process_count() == 1:
        return decide()
    from jax.experimental import multihost_utils

    code, error = _FAILED, None
    if jax.process_index() == 0:
        try:
            code = decide()
        except BaseException as err:  # tell the others before raising, so none waits forever
            error = err
    code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
    if error is not None:
        raise error
    if code == _FAILED:
        raise UserInputError("process 0 could not prepare a stage; its log has the reason")
    return code


def _sync(tag: str) -> None:
    """Barrier across processes (no-op with one): process 0 writes, the others then read."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)
