"""A gs:// workdir: stage outputs, checkpoints, metrics, TensorBoard, the lock.

No bucket is reachable here, so gs:// is served from a local directory by tests/workers/fake_gcs.py, through
the libraries a real bucket goes through (etils.epath -> fsspec "gs", orbax's GCS code path, paths.py); only
the last hop differs (a directory instead of gcsfs, TensorStore's file driver instead of its gcs driver).
Like GCS, the fake cannot append. A local open or mkdir of a path containing "gs:" fails the run.
"""
import json
import os
import subprocess
import sys
import time
import uuid

import jax.numpy as jnp
import pytest

from clue_jax import config_check, run_lock, workdir_fs
from clue_jax.errors import UserInputError
from clue_jax.pipelines.stages import Stages
from clue_jax.train import logging_utils
from clue_jax.models.store import abstract_like
from clue_jax.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "quickstart.py") + ":tiny"
MAIN = os.path.join(ROOT, "tests", "workers", "fake_gcs_main.py")
OVERRIDES = ["--config.clues.arms=('contrast',)", "--config.clues.render_examples=1"]


@pytest.fixture
def bucket(gcs_root):
    name = f"b{uuid.uuid4().hex[:8]}"
    return f"gs://{name}", gcs_root / name


def _files(top) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), top): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(top) for f in files}


def _no_local_gs(*tops):
    for top in tops:
        for d, dirs, files in os.walk(top):
            hits = [x for x in dirs + files if x.startswith("gs:")]
            assert not hits, f"a gs:// path was written locally: {os.path.join(d, hits[0])}"


def test_pipeline_in_a_gs_workdir_runs_and_resumes(tmp_path):
    """The tiny quickstart with --workdir gs://bucket/run, then again: every stage is reused, nothing trains."""
    root, cwd = tmp_path / "gcs", tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, CI="1", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, MAIN, str(root), "--", "--config", TINY, "--workdir", "gs://bucket/run", *OVERRIDES]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    run = root / "bucket" / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages_reused"] == [] and "pretrain_small" in summary["stages_ran"]
    for stage in summary["stages_ran"]:
        assert (run / "stages" / stage / "done.json").exists(), stage
    assert (run / "stages" / "scores_test" / "scores.npz").exists()
    assert (run / "stages" / "tokenizer" / "tokenizer.json").exists()
    assert (run / "clues" / "example_0.png").exists() and (run / "clues" / "example_0.html").exists()
    assert (run / "config.json").exists() and not (run / "config.running.json").exists()
    assert not (run / ".lock").exists()  # released at the end
    # orbax took its GCS path (commit file, no rename) and wrote the arrays below the bucket
    step = run / "stages" / "pretrain_small" / "checkpoints" / "4"
    assert (step / "commit_success.txt").exists() and any("ocdbt" in f for f in _files(step / "state"))
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    stages_logged = {json.loads(line)["stage"] for line in metrics}
    assert {"pretrain_small", "pretrain_large", "cpt_small_contrast_s0"} <= stages_logged  # one object, all stages
    assert any(f.startswith("tensorboard/pretrain_small/events") for f in _files(run))
    assert any(f.startswith("tensorboard/eval/") for f in _files(run))

    before = _files(run)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages_ran"] == [] and set(summary["stages_reused"]) >= {"pretrain_small", "scores_test"}
    after = _files(run)
    assert {k: v for k, v in after.items() if k.startswith("stages/")} == {
        k: v for k, v in before.items() if k.startswith("stages/")}
    assert (run / "metrics.jsonl").read_text().splitlines() == metrics  # nothing trained, nothing lost
    _no_local_gs(cwd, ROOT)


def test_stage_moved_aside_and_config_kept_in_a_bucket(bucket):
    url, local = bucket
    stages = Stages(f"{url}/run")
    stages.run("a", {"x": 1}, lambda d: {"out": workdir_fs.join(d, "o.txt")})
    assert json.loads((local / "run" / "stages" / "a" / "done.json").read_text())["result"] == {"out": "stages/a/o.txt"}
    again = Stages(f"{url}/run").run("a", {"x": 1}, lambda d: pytest.fail("must be reused"))
    assert again["out"] == f"{url}/run/stages/a/o.txt"
    Stages(f"{url}/run").run("a", {"x": 2}, lambda d: {})
    assert (local / "run" / "stages" / "a.previous-1" / "done.json").exists()

    import ml_collections

    for value in (1, 2):
        config_check.write_config(ml_collections.ConfigDict({"v": value}), f"{url}/run")
        config_check.finish_config(f"{url}/run")
    assert json.loads((local / "run" / "config.json").read_text()) == {"v": 2}
    assert json.loads((local / "run" / "config.previous-1.json").read_text()) == {"v": 1}


def test_damaged_checkpoint_in_a_bucket_is_moved_aside(bucket):
    url, local = bucket
    state = {"w": jnp.arange(8.0)}
    ckpt = Checkpointer(f"{url}/run/checkpoints", async_save=False)
    for step in (1, 2):
        ckpt.save(step, state, {"model": "m"})
    ckpt.wait()
    assert str(ckpt.manager.directory) == f"{url}/run/checkpoints"  # the epath Path, not an os.path-joined str
    (local / "run" / "checkpoints" / "2" / "meta" / "metadata").write_text('{"model": [garbled')
    step, _, _ = ckpt.restore_latest(abstract_like(state), {"model": "m"})
    assert step == 1
    assert (local / "run" / "checkpoints.damaged" / "2" / "meta" / "metadata").exists()
    ckpt.close()


def test_metrics_continue_the_buckets_copy_without_appending(bucket, monkeypatch):
    """metrics.jsonl is written locally and uploaded whole; a later writer continues the uploaded object."""
    url, local = bucket
    monkeypatch.setattr(logging_utils, "UPLOAD_S", 0.0)
    first = logging_utils.MetricsWriter(f"{url}/run", "a")
    first.write(1, {"loss": 2.0})
    assert len((local / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # uploaded at the log step
    first.close()
    second = logging_utils.MetricsWriter(f"{url}/run", "b")
    second.write(1, {"loss": 1.0})
    second.close()
    lines = [json.loads(x) for x in (local / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in lines] == ["a", "b"]
    assert {p.split("/")[1] for p in _files(local / "run") if p.startswith("tensorboard/")} == {"a", "b"}


def test_bucket_lock_refuses_a_live_holder_and_takes_over_a_stale_one(bucket, monkeypatch):
    url, local = bucket
    monkeypatch.setattr(run_lock, "SETTLE_S", 0.0)
    (local / "w").mkdir(parents=True)
    other = {"pid": 4242, "host": "elsewhere", "token": "t"}
    (local / "w" / ".lock").write_text(json.dumps({**other, "time": time.time() - 5}))
    with pytest.raises(UserInputError, match=r"in use by pid 4242 on host elsewhere .*renewed \d+ s ago"):
        run_lock.acquire(f"{url}/w")
    (local / "w" / ".lock").write_text(json.dumps({**other, "time": time.time() - run_lock.LEASE_S - 1}))
    run_lock.acquire(f"{url}/w")
    try:
        held = json.loads((local / "w" / ".lock").read_text())
        assert held["pid"] == os.getpid() and time.time() - held["time"] < 60
    finally:
        run_lock.release(f"{url}/w")
    assert not (local / "w" / ".lock").exists()


@pytest.mark.parametrize("workdir", ["memory://bucket/run", "http://host/run"])
def test_a_workdir_url_epath_cannot_reach_is_refused(workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserInputError, match="must be local or start with gs://"):
        config_check.prepare_workdir(workdir)
    assert os.listdir(tmp_path) == []  # not taken for a local directory named "memory:"


def test_a_trained_tokenizer_is_written_into_the_bucket(bucket, tmp_path, monkeypatch):
    """The tokenizer stage (MCL's, and the knowledge pipeline's without a tokenizer.path) in a bucket workdir:
    the library writes local files, the stage uploads them, nothing lands in a local folder named "gs:"."""
    from clue_jax.data.tokenizer import load_tokenizer
    from clue_jax.pipelines import foundations

    url, local = bucket
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLUE_JAX_CACHE", str(tmp_path / "cache"))
    result = foundations.bpe_tokenizer_stage(["Ann Lee was born in Rome and works at Acme."] * 20, 300,
                                             f"{url}/stages/tokenizer")
    assert (local / "stages" / "tokenizer" / "tokenizer.json").exists()
    assert len(load_tokenizer(result["path"])) == result["vocab_size"]
    _no_local_gs(tmp_path)
