"""Faults a real run meets in its workdir: each ends in one line and the
right exit code, and nothing already saved changes.

Most tests start from one finished tiny quickstart run (copied per test); the checkpoint and stage
tests run in-process on a tiny model.
"""
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from clue_jax import run_lock
from clue_jax.data.batching import ArrayBatchSource
from clue_jax.errors import UserInputError
from clue_jax.models import config as model_config
from clue_jax.models.causal_lm import CausalLM
from clue_jax.pipelines.stages import Stages
from clue_jax.parallel import mesh
from clue_jax.train import defaults, loop, objectives

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))
from train_worker import tiny_data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "quickstart.py") + ":tiny"
FAULTY = os.path.join(ROOT, "tests", "workers", "faulty_main.py")


def _env():
    env = dict(os.environ, CI="1", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
    return env


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "clue_jax.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=_env())


def _one_line_error(proc, code=2):
    assert proc.returncode == code, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def _snapshot(workdir) -> dict:
    """Every file (but the lock) with a hash of its bytes."""
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            path = os.path.join(root, f)
            if f != ".lock":
                with open(path, "rb") as fh:
                    out[os.path.relpath(path, workdir)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _unchanged(before: dict, workdir) -> None:
    after = _snapshot(workdir)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"saved files changed or lost: {changed[:5]}"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny quickstart workdir (copy it before use)."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    proc = _cli("--config", TINY, "--workdir", str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.fixture
def run_copy(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    return workdir


# ------------------------------------------------------------------ a config typo keeps config.json
@pytest.mark.slow
def test_config_typo_on_existing_run_keeps_config_json(run_copy):
    before = _snapshot(run_copy)
    line = _one_line_error(_cli("--config", "configs/quickstrat.py", "--workdir", str(run_copy)))
    assert line.startswith("error: no config file 'configs/quickstrat.py'") and "--config quickstart:tiny" in line
    _unchanged(before, run_copy)
    assert not (run_copy / "config.running.json").exists()


@pytest.mark.slow
def test_three_configs_keep_config_json_matching_summary_and_every_previous_stage(run_copy):
    """A NaN run leaves config.json (which matches summary.json) alone; a later good run keeps the
    first config as config.previous-1.json; the first and second runs' stages stay as .previous-1/-2."""
    stage = run_copy / "stages" / "cpt_small_plain_s0"
    first_config = (run_copy / "config.json").read_text()
    first_done = (stage / "done.json").read_bytes()
    summary = (run_copy / "summary.json").read_bytes()

    line = _one_line_error(_cli("--config", TINY, "--workdir", str(run_copy), "--config.cpt.lr=1e9"))
    assert "loss is nan" in line.lower() or "loss is inf" in line.lower(), line
    assert (run_copy / "config.json").read_text() == first_config
    assert json.loads((run_copy / "config.running.json").read_text())["cpt"]["lr"] == 1e9
    assert (run_copy / "stages" / "cpt_small_plain_s0.previous-1" / "done.json").read_bytes() == first_done
    assert (run_copy / "summary.json").read_bytes() == summary

    third = _cli("--config", TINY, "--workdir", str(run_copy), "--config.cpt.steps=2")
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads((run_copy / "config.json").read_text())["cpt"]["steps"] == 2
    assert (run_copy / "config.previous-1.json").read_text() == first_config
    assert not (run_copy / "config.running.json").exists()
    assert (run_copy / "stages" / "cpt_small_plain_s0.previous-1" / "done.json").read_bytes() == first_done
    second = json.loads((run_copy / "stages" / "cpt_small_plain_s0.previous-2" / "started.json").read_text())
    assert second["fingerprint"] != json.loads(first_done)["fingerprint"]
    assert "cpt_small_plain_s0.previous-2" in third.stderr  # the move is logged


# ------------------------------------------------------------------ damaged checkpoints
def _trainer(workdir, steps):
    cfg = model_config.gpt2(vocab_size=64, d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=16)
    tcfg = defaults.train_config(steps=steps, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, checkpoint_every=2,
                                 keep_checkpoints=5)
    return loop.Trainer(CausalLM(cfg, rngs=nnx.Rngs(0)), objectives.causal_lm, tcfg,
                        mesh.make_mesh((1, 1, 1), jax.devices()[:1]), str(workdir), meta={"model": cfg.to_dict()})


def _params(result):
    return jax.tree.map(np.asarray, nnx.state(result.model, nnx.Param))


@pytest.fixture(scope="module")
def straight_params(tmp_path_factory):
    return _params(_trainer(tmp_path_factory.mktemp("straight"), 6).run(ArrayBatchSource(tiny_data(), batch_size=8)))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A workdir with checkpoints at steps 2 and 4 (copy it before use)."""
    workdir = tmp_path_factory.mktemp("four") / "w"
    _trainer(workdir, 4).run(ArrayBatchSource(tiny_data(), batch_size=8))
    return workdir


def _data_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "ocdbt.process_0" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    path = _data_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bytes(step_dir):
    path = _data_file(step_dir)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {  # kind: (how, what the warning says)
    "truncated_data_file": (_truncate, "corrupt or partial"),
    "deleted_METADATA": (lambda d: (d / "state" / "_METADATA").unlink(), "corrupt or partial"),
    "garbled_meta": (lambda d: (d / "meta" / "metadata").write_text('{"model": [garbled'), "unreadable metadata"),
    # orbax often reads these without complaint (the checksum catches them); where the flip lands in a
    # compressed block's framing the read itself fails. Either way the step must not load.
    "flipped_bytes": (_flip_bytes, "(checksum mismatch|corrupt or partial)"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_and_training_goes_on(tmp_path, kind, four_steps, straight_params,
                                                                     caplog):
    tmp_path = tmp_path / "w"
    shutil.copytree(four_steps, tmp_path)
    step4 = tmp_path / "checkpoints" / "4"
    damage, reason = DAMAGE[kind]
    damage(step4)
    damaged = _snapshot(step4)
    with caplog.at_level("INFO"):
        result = _trainer(tmp_path, 6).run(ArrayBatchSource(tiny_data(), batch_size=8))  # saves step 4 again
    assert "checkpoint step 4" in caplog.text and re.search(f"is damaged: {reason}", caplog.text)
    assert "resumed from step 2" in caplog.text
    assert _snapshot(tmp_path / "checkpoints.damaged" / "4") == damaged  # set aside as it was, not deleted
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2, 4, 6]
    for a, b in zip(jax.tree.leaves(_params(result)), jax.tree.leaves(straight_params)):
        np.testing.assert_array_equal(a, b)


def test_doctored_checksum_is_a_damaged_step(tmp_path, four_steps):
    """A checksum that does not match what is read sets the step aside (not only orbax read errors)."""
    tmp_path = tmp_path / "w"
    shutil.copytree(four_steps, tmp_path)
    meta_file = tmp_path / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    key = sorted(meta["checksums"])[0]
    meta["checksums"][key] ^= 1
    meta_file.write_text(json.dumps(meta))
    from clue_jax.train.checkpoint import Checkpointer

    assert _trainer(tmp_path, 4).restore(Checkpointer(str(tmp_path / "checkpoints"))) == 2
    assert (tmp_path / "checkpoints.damaged" / "4" / "meta" / "metadata").exists()


# ------------------------------------------------------------------ items 3, 5, 6: stages
class Crash(Exception):
    pass


class CrashAt(ArrayBatchSource):
    def batch(self, step, rows=None):
        if step == 3:
            raise Crash
        return super().batch(step, rows)


def _train_stage(lr, crash=False, crash_after=None):
    def fn(stage_dir):
        cfg = model_config.gpt2(vocab_size=64, d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=16)
        tcfg = defaults.train_config(steps=4, batch_size=8, lr=lr, warmup_steps=1, checkpoint_every=2)
        trainer = loop.Trainer(CausalLM(cfg, rngs=nnx.Rngs(0)), objectives.causal_lm, tcfg,
                               mesh.make_mesh((1, 1, 1), jax.devices()[:1]), stage_dir, meta={"model": cfg.to_dict()})
        source = (CrashAt if crash else ArrayBatchSource)(tiny_data(), batch_size=8)
        result = trainer.run(source)
        np.savez(os.path.join(stage_dir, "params.npz"), *jax.tree.leaves(_params(result)))
        if crash_after is not None:  # killed after the final checkpoint and the outputs, before done.json
            crash_after.append(result.metrics["loss"])
            raise Crash
        return {"params": os.path.join(stage_dir, "params.npz"), "final_loss": result.metrics.get("loss")}
    return fn


def test_unfinished_stage_under_a_changed_config_is_moved_aside_not_resumed(tmp_path, caplog):
    stages = Stages(str(tmp_path))
    with pytest.raises(Crash):  # killed after the checkpoint at step 2
        stages.run("pretrain", {"lr": 3e-3}, _train_stage(3e-3, crash=True))
    with caplog.at_level("INFO"):
        changed = Stages(str(tmp_path)).run("pretrain", {"lr": 1e-3}, _train_stage(1e-3))
    assert "resumed from step" not in caplog.text
    assert "pretrain.previous-1" in caplog.text
    assert os.path.isdir(tmp_path / "stages" / "pretrain.previous-1" / "checkpoints" / "2")  # the killed run's
    clean = Stages(str(tmp_path / "clean")).run("pretrain", {"lr": 1e-3}, _train_stage(1e-3))
    got, want = np.load(changed["params"]), np.load(clean["params"])
    for key in want.files:
        np.testing.assert_array_equal(got[key], want[key])


def test_unfinished_stage_with_the_same_config_resumes(tmp_path, caplog):
    with pytest.raises(Crash):
        Stages(str(tmp_path)).run("pretrain", {"lr": 3e-3}, _train_stage(3e-3, crash=True))
    with caplog.at_level("INFO"):
        Stages(str(tmp_path)).run("pretrain", {"lr": 3e-3}, _train_stage(3e-3))
    assert "resumed from step 2" in caplog.text
    assert not (tmp_path / "stages" / "pretrain.previous-1").exists()


def test_a_stage_killed_before_done_json_or_missing_it_reruns_to_its_true_final_loss(tmp_path, caplog):
    trained = []  # the loss the killed run reached at its last step
    with pytest.raises(Crash):
        Stages(str(tmp_path)).run("pretrain", {"lr": 3e-3}, _train_stage(3e-3, crash_after=trained))
    want = trained[0]
    assert isinstance(want, float)
    done = tmp_path / "stages" / "pretrain" / "done.json"
    assert not done.exists()
    for attempt in ("killed before done.json", "done.json deleted"):
        with caplog.at_level("INFO"):
            Stages(str(tmp_path)).run("pretrain", {"lr": 3e-3}, _train_stage(3e-3))
        assert "resumed from step 4" in caplog.text, attempt
        assert json.loads(done.read_text())["result"]["final_loss"] == want, attempt
        done.unlink()
        caplog.clear()


def _write_stage(text):
    def fn(stage_dir):
        with open(os.path.join(stage_dir, "out.txt"), "w") as f:
            f.write(text)
        return {"file": os.path.join(stage_dir, "out.txt"), "n": 1}
    return fn


def test_every_previous_copy_of_a_stage_is_kept(tmp_path):
    for i in range(3):
        Stages(str(tmp_path)).run("tokenizer", {"config": i}, _write_stage(f"config {i}"))
    root = tmp_path / "stages"
    assert (root / "tokenizer.previous-1" / "out.txt").read_text() == "config 0"
    assert (root / "tokenizer.previous-2" / "out.txt").read_text() == "config 1"
    assert (root / "tokenizer" / "out.txt").read_text() == "config 2"


def test_moved_workdir_resolves_stage_paths_in_the_new_place(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    Stages(str(old)).run("tokenizer", {"config": 0}, _write_stage("x"))
    assert json.loads((old / "stages" / "tokenizer" / "done.json").read_text())["result"]["file"] == \
        "stages/tokenizer/out.txt"
    os.rename(old, new)
    stages = Stages(str(new))
    result = stages.run("tokenizer", {"config": 0}, _write_stage("rerun"))
    assert stages.reused == ["tokenizer"] and result["file"] == str(new / "stages" / "tokenizer" / "out.txt")


@pytest.mark.slow
def test_moved_workdir_reuses_every_stage(run_copy, tmp_path):
    moved = tmp_path / "moved"
    os.rename(run_copy, moved)  # the old place is gone: nothing can be read from there
    proc = _cli("--config", TINY, "--workdir", str(moved))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((moved / "summary.json").read_text())["stages_ran"] == []


def _doctor_checksum(model_dir):
    """One saved checksum off by one bit, the file's size kept: only reading the model can tell."""
    path = model_dir / "checksums.json"
    size, sums = path.stat().st_size, json.loads(path.read_text())
    sums[min(sums)] ^= 1
    path.write_text(json.dumps(sums, indent=0, sort_keys=True))
    assert path.stat().st_size == size


@pytest.mark.slow
def test_damaged_finished_stages_are_moved_aside_and_rerun_with_their_true_results(run_copy):
    """A deleted tokenizer.json, a saved model whose arrays no longer match their checksums and a training stage
    whose done.json is gone: each stage reruns (one warning line each), the summary keeps the true final loss."""
    stages, cpt = run_copy / "stages", "cpt_small_plain_s0"
    want = json.loads((stages / cpt / "done.json").read_text())["result"]["final_loss"]
    (stages / "tokenizer" / "tokenizer.json").unlink()
    _doctor_checksum(stages / "pretrain_small" / "model")
    (stages / cpt / "done.json").unlink()
    proc = _cli("--config", TINY, "--workdir", str(run_copy))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "stage tokenizer: its output is damaged (tokenizer.json is missing), running it again" in proc.stderr
    assert re.search(r"stage \S+: saved model \S+/stages/pretrain_small/model is damaged: checksum mismatch in 1 "
                     r"arrays, .*; stage pretrain_small was moved aside to \S+/pretrain_small.damaged-1; running the "
                     r"pipeline again", proc.stderr), proc.stderr[-3000:]
    for name in ("tokenizer", "pretrain_small"):
        assert (stages / f"{name}.damaged-1" / "done.json").exists() and (stages / name / "done.json").exists()
    assert json.loads((stages / cpt / "done.json").read_text())["result"]["final_loss"] == want
    assert json.loads((run_copy / "summary.json").read_text())["stages"][cpt]["result"]["final_loss"] == want


# ------------------------------------------------------------------ one run per workdir
@pytest.mark.slow
def test_second_run_into_a_workdir_is_refused_at_once(run_copy):
    before = _snapshot(run_copy)
    with open(run_copy / ".lock", "w") as held:  # another run holds the lock
        held.write("pid 4242 on host elsewhere\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = _one_line_error(_cli("--config", TINY, "--workdir", str(run_copy)))
    assert str(run_copy) in line and "pid 4242 on host elsewhere" in line
    _unchanged(before, run_copy)


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path):
    (tmp_path / ".lock").write_text("pid 999999 on host gone\n")  # its holder died; the kernel freed the flock
    run_lock.acquire(str(tmp_path))
    try:
        assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()} on host {socket.gethostname()}\n"
        with open(tmp_path / ".lock") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # now really held
    finally:
        run_lock.release(str(tmp_path))


def test_lock_refusal_names_the_holder(tmp_path):
    run_lock.acquire(str(tmp_path))
    held = run_lock._held.pop(str(tmp_path))  # stays locked, as by another run
    try:
        with pytest.raises(UserInputError, match=f"in use by pid {os.getpid()} on host"):
            run_lock.acquire(str(tmp_path))
    finally:
        for fd in held:
            os.close(fd)


def test_deleting_the_lock_file_of_a_live_run_does_not_free_the_workdir(tmp_path):
    run_lock.acquire(str(tmp_path))
    held = run_lock._held.pop(str(tmp_path))  # a live run
    try:
        (tmp_path / ".lock").unlink()  # "stale", thinks the user
        with pytest.raises(UserInputError, match=r"in use by another run \(its record .*\.lock was deleted\)"):
            run_lock.acquire(str(tmp_path))
    finally:
        for fd in held:
            os.close(fd)  # the run ends
    run_lock.acquire(str(tmp_path))  # and its workdir is free again
    run_lock.release(str(tmp_path))


# ------------------------------------------------------------------ disk, done.json, Ctrl-C
def _faulty(errno_name, path_part, *args):
    return subprocess.run([sys.executable, FAULTY, errno_name, path_part, "--", *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=_env())


@pytest.mark.slow
def test_read_only_workdir_is_one_line(run_copy):
    before = _snapshot(run_copy)
    line = _one_line_error(_faulty("EROFS", str(run_copy), "--config", TINY, "--workdir", str(run_copy)))
    assert "Read-only file system" in line and str(run_copy) in line and "writable --workdir" in line
    _unchanged(before, run_copy)


@pytest.mark.slow
def test_full_disk_is_one_line_and_keeps_finished_stages(tmp_path):
    workdir = tmp_path / "w"
    line = _one_line_error(_faulty("ENOSPC", "stages/tokenizer/done.json", "--config", TINY, "--workdir",
                                   str(workdir)))
    assert "No space left on device" in line and "stages/tokenizer/done.json" in line and "free some space" in line
    assert json.loads((workdir / "stages" / "world" / "done.json").read_text())["result"] == {"background": 24,
                                                                                            "new": 8}
    assert not (workdir / "stages" / "tokenizer" / "done.json").exists()


@pytest.mark.slow
def test_truncated_done_json_is_one_line(run_copy):
    done = run_copy / "stages" / "tokenizer" / "done.json"
    done.write_bytes(done.read_bytes()[:40])
    before = _snapshot(run_copy)
    line = _one_line_error(_cli("--config", TINY, "--workdir", str(run_copy)))
    assert str(done) in line and "unreadable" in line and f"delete {done.parent}" in line
    _unchanged(before, run_copy)


def _until(proc, text, lines):
    for line in proc.stderr:
        lines.append(line)
        if text in line:
            return
    raise AssertionError("".join(lines[-50:]))


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_like_sigterm_and_exits_130(tmp_path):
    workdir = tmp_path / "w"
    args = [sys.executable, "-m", "clue_jax.main", "--config", TINY, "--workdir", str(workdir),
            "--config.pretrain.steps=100000", "--config.pretrain.checkpoint_every=100000"]
    ckpts = workdir / "stages" / "pretrain_small" / "checkpoints"
    for attempt in range(2):
        proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
        lines = []
        if attempt == 1:
            _until(proc, "resumed from step", lines)
        _until(proc, "pretrain_small step", lines)  # the trainer is in its loop
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        done = subprocess.CompletedProcess(args, proc.returncode, out, "".join(lines) + err)
        line = _one_line_error(done, code=130)
        assert "interrupted (Ctrl-C)" in line
        assert "SIGINT received: saving a checkpoint" in done.stderr
        steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
        assert steps and 0 < steps[-1] < 100000
        if attempt == 1:
            assert f"resumed from step {first}" in done.stderr and steps[-1] > first
        first = steps[-1]
    assert not (workdir / "stages" / "pretrain_small" / "done.json").exists()
    assert not (workdir / "config.json").exists() and (workdir / "config.running.json").exists()
