"""Run outputs: metrics.jsonl keyed by run and deduplicated on resume, TensorBoard tags and hyper-parameters,
W&B in its offline mode, tracker names refused in one line, the run's identity, workdir-relative summary
paths and the heartbeat of a silent stage."""
import glob
import json
import logging
import os
import struct
import subprocess

import jax
import ml_collections
import pytest

from clue_jax import run_identity, trackers
from clue_jax.errors import UserInputError
from clue_jax.train import logging_utils


def _config(lr=1e-3, **logging_section) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"cpt": {"lr": lr, "steps": 4}, "logging": {"trackers": (), **logging_section}})


def _lines(workdir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _write(workdir, stage, steps, loss, forget_after=None):
    writer = logging_utils.MetricsWriter(str(workdir), stage)
    if forget_after is not None:
        writer.forget_after(forget_after)
    for step in steps:
        writer.write(step, {"loss": loss})
    writer.close()


def test_metrics_lines_carry_the_run_id_and_a_resume_replaces_what_the_killed_run_logged(tmp_path):
    first = logging_utils.Run.of(_config())
    changed = logging_utils.Run.of(_config(lr=2e-3))
    assert first.id == logging_utils.Run.of(_config()).id != changed.id  # the id follows the config
    with logging_utils.current_run(first):
        _write(tmp_path, "cpt", [1, 2, 3, 4], loss=1.0)  # killed after step 4, last checkpoint at 2
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"run": "cut by a ki')  # a line cut by kill -9
    with logging_utils.current_run(changed):
        _write(tmp_path, "cpt", [1, 2], loss=5.0, forget_after=0)
    with logging_utils.current_run(first):
        _write(tmp_path, "cpt", [3, 4], loss=0.5, forget_after=2)  # the resume
    lines = _lines(tmp_path)
    ours = [(l["step"], l["loss"]) for l in lines if l["run"] == first.id]
    assert ours == [(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.5)]  # each step once, the resumed run's from 3 on
    assert [(l["step"], l["loss"]) for l in lines if l["run"] == changed.id] == [(1, 5.0), (2, 5.0)]
    assert all(set(l) == {"run", "stage", "step", "loss"} and l["stage"] == "cpt" for l in lines)


def _events(run_dir) -> tuple[dict, dict]:
    """(scalars {tag: [(step, value)]}, texts {tag: str}) of the tfevents files in run_dir."""
    from tensorboardX.proto import event_pb2

    scalars, texts = {}, {}
    for name in sorted(os.listdir(run_dir)):
        data, pos = open(os.path.join(run_dir, name), "rb").read(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.WhichOneof("value") == "simple_value":
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
                elif v.HasField("tensor"):
                    texts[v.tag] = b"".join(v.tensor.string_val).decode()
    return scalars, texts


def test_tensorboard_tags_are_prefixed_and_the_hyperparameters_are_logged(tmp_path):
    run = logging_utils.Run.of(_config(trackers=("tensorboard",)))
    with logging_utils.current_run(run):
        writer = logging_utils.MetricsWriter(str(tmp_path), "cpt")
        writer.write(2, {"loss": 1.5, "lr": 1e-3})
        writer.write(2, {"eval/cloze": 0.25})
        writer.close()
    scalars, texts = _events(tmp_path / "tensorboard" / "cpt")
    assert scalars == {"train/loss": [(2, 1.5)], "train/lr": [(2, pytest.approx(1e-3))], "eval/cloze": [(2, 0.25)]}
    table = next(iter(texts.values()))
    assert "| cpt.lr | 0.001 |" in table and f'| run.id | "{run.id}" |' in table


def _wandb_records(path):
    """The protobuf records of a W&B run file (LevelDB log framing: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = open(path, "rb").read(), 7, b""  # 7: the file's ":W&B" header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_gets_the_scalars_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'clue-jax[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = logging_utils.Run.of(_config(trackers=("wandb",)))
    with logging_utils.current_run(run):
        _write(tmp_path, "cpt", [1, 2], loss=0.75)
    files = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run.id}-cpt" / "*.wandb"))
    assert len(files) == 1
    history, config = {}, {}
    for record in _wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
    assert history == {1: {"train/loss": 0.75}, 2: {"train/loss": 0.75}}
    assert config["cpt.lr"] == 1e-3 and config["run.id"] == run.id


def test_tracker_names_are_checked_in_one_line(monkeypatch):
    assert trackers.problem(("tensorboard",)) is None and trackers.problem(()) is None
    assert "unknown tracker 'tensorbord'; known: tensorboard, wandb" in trackers.problem(("tensorbord",))
    assert "twice" in trackers.problem(("tensorboard", "tensorboard"))
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(UserInputError, match=r"^--config.logging.trackers=\('wandb',\): tracker 'wandb' needs wandb, "
                                             r"which is not installed: pip install 'clue-jax\[wandb\]'"):
        logging_utils.Run.of(_config(trackers=("wandb",)))
    monkeypatch.setitem(__import__("sys").modules, "tensorboardX", None)  # imported only when named
    with pytest.raises(UserInputError, match="tensorboardX is not installed"):
        trackers.TensorBoardTracker("unused")


def test_run_identity_names_this_checkouts_commit_and_the_versions(tmp_path):
    record = run_identity.identity()
    root = os.path.dirname(os.path.dirname(run_identity.__file__))
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True)
    assert record["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert isinstance(record["dirty"], bool) == (record["commit"] is not None)
    assert record["versions"]["jax"] == jax.__version__ and record["versions"]["python"].startswith("3.")
    assert {"flax", "optax", "orbax-checkpoint", "transformers"} <= set(record["versions"])
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    (tmp_path / "repo" / "site").mkdir()
    assert run_identity._git_state(str(tmp_path / "repo" / "site")) == (None, None)  # a wheel inside a repo
    assert run_identity._git_state(str(tmp_path)) == (None, None)


def test_summary_records_the_run_and_paths_relative_to_the_workdir(tmp_path):
    run = logging_utils.Run.of(_config())
    workdir = tmp_path / "w"
    with logging_utils.current_run(run):
        logging_utils.write_summary(str(workdir), {"clue_views": [str(workdir / "clues" / "example_0.html")],
                                                   "elsewhere": str(tmp_path / "x.html")})
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["clue_views"] == ["clues/example_0.html"] and summary["elsewhere"] == str(tmp_path / "x.html")
    assert summary["run"] == run.record() and summary["run"]["id"] == run.id


def test_a_silent_stage_says_it_is_still_running(caplog):
    caplog.set_level(logging.INFO, logger="clue_jax")
    with logging_utils.heartbeat("stage 3: eval_small", every=0.1):
        import time

        time.sleep(0.45)
    beats = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert beats and beats[0].startswith("stage 3: eval_small: still running (")
    caplog.clear()
    with logging_utils.heartbeat("stage 4: cpt", every=0.3):
        for _ in range(6):
            logging.getLogger("clue_jax").info("step")  # a stage that talks gets no heartbeat
            time.sleep(0.1)
    assert not [r for r in caplog.records if "still running" in r.getMessage()]
