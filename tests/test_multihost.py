"""Multi-host: 2 processes train exactly like 1 process on every mesh; checkpoints move between mesh
shapes and process counts; the local launcher starts, reports and stops its processes.

2 processes x 1 device (tests/workers/mesh_worker.py) on (1, 1, 2), (1, 2, 1)
and (2, 1, 1) meshes: each process loads the rows of every global batch its
device holds (all of them when `tensor` spans the processes), and pre-training,
teacher scoring and clue-dropout continual pre-training agree with 1 process x
2 devices; a per-process batch of the wrong size is refused with one line.

The slow quickstart run goes through `launch/local_multiprocess.sh` (jax.distributed
over loopback, gloo collectives) on a (data 1, fsdp 2, tensor 2) mesh, so the
parameters are sharded across the processes as on a pod: the teachers score on
a mesh spanning both processes, only
process 0 writes metrics and summaries, and orbax saves from both processes.
To keep the test short the 2-process run reuses the single-process run's
world, tokenizer, pre-trained base models and their evaluation (stage
caching); everything the student needs (teacher scores, clue dropout,
continual pre-training, evaluation) runs again in 2 processes and must agree
with one process.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from clue_jax.data import batching
from clue_jax.data.batching import ArrayBatchSource
from clue_jax.errors import UserInputError
from clue_jax.models import config as model_config
from clue_jax.models import factory
from clue_jax.models.causal_lm import CausalLM
from clue_jax.parallel import mesh
from clue_jax.parallel import rules as shard_lib
from clue_jax.train import defaults, loop, objectives
from clue_jax.train.checkpoint import Checkpointer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))
import mesh_worker  # noqa: E402
from train_worker import tiny_data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.sh")
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py") + ":tiny"
# The quickstart's student with clue dropout (contrast arm: both teachers score, the student drops tokens).
OVERRIDES = ["--config.clues.arms=('contrast',)", "--config.clues.render_examples=0", "--config.eval.cloze=False"]
REUSED = ("world", "tokenizer", "pretrain_small", "pretrain_large", "eval_base_small")


def _env(**extra):
    env = dict(os.environ, CI="1", JAX_PLATFORMS="cpu", PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)  # each run below sets its own device count
    env.update(extra)
    return env


def _launch(n, *args, timeout=600, **env):
    return subprocess.run(["bash", LAUNCHER, str(n), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=_env(**env))


def _cpt_dir(workdir):
    (name,) = [d for d in os.listdir(workdir / "stages") if d.startswith("cpt_") and "contrast" in d]
    return workdir / "stages" / name


def _metrics(workdir):
    """The contrast student's training records from the run's metrics.jsonl."""
    stage = _cpt_dir(workdir).name
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["stage"] == stage]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process workdir, 2-process workdir, 2-process launcher result)."""
    base = tmp_path_factory.mktemp("multihost")
    one, two = base / "one", base / "two"
    proc = subprocess.run([sys.executable, "-m", "clue_jax.main", "--config", QUICKSTART, "--workdir", str(one),
                           *OVERRIDES], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage in REUSED:
        shutil.copytree(one / "stages" / stage, two / "stages" / stage)
    # fsdp over the two processes, tensor within each: parameters are sharded across hosts, as on a pod.
    multi = _launch(2, "--", "--config", QUICKSTART, "--workdir", str(two), *OVERRIDES, "--config.mesh.shape=(1,2,2)",
                    DEVICES_PER_PROCESS="2", LOG_DIR=str(base / "logs"))
    assert multi.returncode == 0, multi.stderr[-4000:]
    return one, two, multi, base / "logs"


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    one, two, multi, logs = runs
    summary1 = json.loads((one / "summary.json").read_text())
    summary2 = json.loads((two / "summary.json").read_text())
    assert set(REUSED) <= set(summary2["stages_reused"])
    assert "scores_test" in summary2["stages_ran"] and "eval_small_contrast_s0" in summary2["stages_ran"]
    m1, m2 = _metrics(one), _metrics(two)
    assert m1, "no training records for the contrast student"
    assert [m["step"] for m in m1] == [m["step"] for m in m2]  # process 1 wrote no second copy
    for key in ("loss", "grad_norm", "input_tokens"):
        np.testing.assert_allclose([m[key] for m in m2], [m[key] for m in m1], rtol=1e-5, err_msg=key)
    final1 = summary1["models"]["contrast_s0"]["train"]["final_loss"]
    final2 = summary2["models"]["contrast_s0"]["train"]["final_loss"]
    np.testing.assert_allclose(final2, final1, rtol=1e-5)
    s1, s2 = (np.load(w / "stages" / "scores_test" / "scores.npz") for w in (one, two))
    for size in ("large", "small"):
        np.testing.assert_allclose(s2[size], s1[size], atol=1e-6)
    for name in ("base_small", "contrast_s0"):
        assert summary2["models"][name]["qa"] == summary1["models"][name]["qa"]
    # Only process 0 reports: one result table, on the launcher's own output.
    assert multi.stdout.count("QA exact match") == 1
    assert "QA exact match" not in (logs / "process_1.log").read_text()


@pytest.mark.slow
def test_checkpoint_written_by_two_processes_loads_on_other_meshes(runs):
    one, two, _, _ = runs
    loaded = {}
    for shape in ((2, 2, 2), (1, 1, 1)):
        m = mesh.make_mesh(shape, jax.devices()[: int(np.prod(shape))])
        model, _ = factory.load_params(str(_cpt_dir(two) / "model"), m)
        loaded[shape] = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    reference, _ = factory.load_params(str(_cpt_dir(one) / "model"), mesh.make_mesh((1, 1, 1), jax.devices()[:1]))
    reference = jax.tree.map(np.asarray, nnx.state(reference, nnx.Param))
    for a, b, r in zip(jax.tree.leaves(loaded[(2, 2, 2)]), jax.tree.leaves(loaded[(1, 1, 1)]), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- 2 processes x 1 device
MESH_WORKER = os.path.join(ROOT, "tests", "workers", "mesh_worker.py")
# tensor across the processes (each needs the whole batch), fsdp across them, data across them.
SHAPES = ("1,1,2", "1,2,1", "2,1,1")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(out, *args, timeout=300):
    """Runs mesh_worker.py in 2 processes x 1 CPU device (jax.distributed over loopback, gloo); [(rc, stderr)]."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, MESH_WORKER, str(out), *args], cwd=ROOT, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                                       XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=ROOT))
             for i in range(2)]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_processes_of_one_device_train_like_one_process_on_every_mesh(tmp_path):
    """Pre-training, teacher scoring and clue-dropout continual pre-training (new documents + replay rows):
    the same losses, scores and weights as 1 process x 2 devices."""
    results = _two_processes(tmp_path / "mp", *SHAPES)
    for rc, err in results:
        assert rc == 0, err[-3000:]
    multi = json.loads((tmp_path / "mp" / "result.json").read_text())
    for text in SHAPES:
        shape = tuple(int(s) for s in text.split(","))
        ref = mesh_worker.train_on_mesh(shape, jax.devices()[:2], str(tmp_path / "sp" / text))
        for stage in ("pretrain", "cpt"):
            got, want = np.asarray(multi[text][stage]), np.asarray(ref[stage])
            assert got.shape == want.shape == (2, 3), (text, stage)  # log_every=2 over 4 steps
            np.testing.assert_array_equal(got[:, 0], want[:, 0])
            np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=1e-5, err_msg=f"{text} {stage}")
        np.testing.assert_allclose(multi[text]["scores"], ref["scores"], rtol=1e-5, atol=1e-7, err_msg=f"{text} scores")
        full = mesh_worker.BATCH * mesh_worker.SEQ
        assert (np.asarray(ref["cpt"])[:, 2] < full).all()  # clue dropout really deleted tokens
        assert ref["params"].keys() == multi[text]["params"].keys()
        for key, value in ref["params"].items():
            np.testing.assert_allclose(multi[text]["params"][key], value, rtol=1e-5, atol=1e-6, err_msg=f"{text} {key}")


def test_a_wrong_per_host_batch_is_refused_with_one_line(tmp_path):
    """A source that splits rows by process index while the tensor axis spans the processes."""
    for rc, err in _two_processes(tmp_path, "--wrong-batch", timeout=120):
        assert rc == 2, err[-3000:]
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert "mesh" in line and "'tensor': 2" in line and "(2, 16)" in line and "(4, 16)" in line, line


def test_each_process_loads_the_rows_its_devices_hold():
    """tensor across hosts: every replica loads the whole batch; data/fsdp across hosts: disjoint halves."""
    devices = np.asarray(jax.devices()[:8])
    for shape, want in (((1, 1, 8), [range(8)]), ((2, 1, 4), [range(4), range(4, 8)]),
                        ((1, 4, 2), [range(2 * i, 2 * i + 2) for i in range(4)])):
        m = mesh.make_mesh(shape, devices)
        index_map = shard_lib.batch_sharding(m, 1).devices_indices_map((8,))
        held = {tuple(range(*index_map[d][0].indices(8))) for d in devices}
        assert held == {tuple(r) for r in want}, shape
    m = mesh.make_mesh((2, 2, 2), devices)
    np.testing.assert_array_equal(batching.process_rows(m, 8), np.arange(8))  # one process holds everything
    parts = [({"x": np.arange(10)[:, None] + 100}, 3), ({"x": np.arange(10)[:, None] + 200}, 5)]
    concat = batching.ConcatBatchSource(parts, seed=1)
    whole = concat.batch(3)["x"]
    for rows in ([0, 1, 2, 3], [2, 3, 6], [5, 6, 7]):
        np.testing.assert_array_equal(concat.batch(3, np.asarray(rows))["x"], whole[rows])
    with pytest.raises(UserInputError, match=r"needs shape \(8, 1\)"):
        batching.global_batch({"x": whole[:4]}, m, 8, batching.process_rows(m, 8))


# ----------------------------------------------------------------------------- mesh changes, one process
def _trainer(workdir, shape, steps=4):
    cfg = model_config.llama(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64)
    tcfg = defaults.train_config(steps=steps, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, checkpoint_every=2,
                                 keep_checkpoints=3)
    m = mesh.make_mesh(shape, jax.devices()[: int(np.prod(shape))])
    return loop.Trainer(CausalLM(cfg, rngs=nnx.Rngs(0)), objectives.causal_lm, tcfg, m, str(workdir),
                        meta={"model": cfg.to_dict()})


def _params(trainer):
    return jax.tree.map(np.asarray, trainer.state["params"])


def test_checkpoint_restores_onto_another_mesh_shape_and_training_continues(tmp_path):
    data = ArrayBatchSource(tiny_data(), batch_size=8, seed=0)
    full = _trainer(tmp_path / "a", (2, 2, 2))
    full.run(data)  # 4 steps on (data 2, fsdp 2, tensor 2); checkpoints at steps 2 and 4
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")  # as if stopped after step 2

    restored = {}
    for shape in ((2, 2, 2), (8, 1, 1), (1, 1, 1)):
        trainer = _trainer(tmp_path / "b", shape)
        checkpointer = Checkpointer(str(tmp_path / "b" / "checkpoints"))
        assert trainer.restore(checkpointer) == 2
        checkpointer.close()
        leaf = jax.tree.leaves(trainer.state["params"])[0]
        assert leaf.sharding.mesh.devices.shape == shape
        restored[shape] = _params(trainer)
    for shape in ((8, 1, 1), (1, 1, 1)):
        for a, b in zip(jax.tree.leaves(restored[(2, 2, 2)]), jax.tree.leaves(restored[shape])):
            np.testing.assert_array_equal(a, b)  # bit-identical on the new mesh
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored[(2, 2, 2)]), jax.tree.leaves(_params(full))))

    resumed = _trainer(tmp_path / "b", (8, 1, 1))
    result = resumed.run(data)  # steps 3 and 4 on the new mesh
    assert result.step == 4
    for a, b in zip(jax.tree.leaves(_params(resumed)), jax.tree.leaves(_params(full))):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- the launcher itself
def test_dry_run_prints_one_loopback_command_per_process():
    proc = _launch(3, "--dry-run", "--", "--config", QUICKSTART, "--workdir", "/tmp/some where",
                   DEVICES_PER_PROCESS="4", PORT="12345")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert f"JAX_PROCESS_ID={i} " in line and "JAX_NUM_PROCESSES=3 " in line
        assert "JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 " in line
        assert "--xla_force_host_platform_device_count=4 " in line
        assert "-m clue_jax.main --config" in line and "some\\ where" in line


def test_bad_usage_is_refused():
    assert _launch(0).returncode == 2
    assert _launch(2, "--bogus").returncode == 2


def test_one_failing_process_stops_the_others(tmp_path):
    """A process that dies must not leave the others waiting forever in a collective."""
    fake = tmp_path / "fake_python"
    fake.write_text('#!/usr/bin/env bash\n'
                    # process 1 fails once process 0 is up (no race with process 0 writing its pid)
                    f'if [[ "$JAX_PROCESS_ID" == "1" ]]; then while [[ ! -s {tmp_path}/pid0 ]]; do sleep 0.1; done; '
                    'echo boom >&2; exit 3; fi\n'
                    f'echo $$ > {tmp_path}/pid0.tmp; mv {tmp_path}/pid0.tmp {tmp_path}/pid0; exec sleep 300\n')
    fake.chmod(0o755)
    t0 = time.time()
    proc = _launch(2, "--", "--config", QUICKSTART, "--workdir", str(tmp_path / "w"), timeout=60,
                   PYTHON=str(fake), LOG_DIR=str(tmp_path / "logs"), PORT="12345")
    assert proc.returncode == 3
    assert time.time() - t0 < 30
    assert "process 1 exited with status 3" in proc.stderr and "boom" in proc.stderr
    pid0 = int((tmp_path / "pid0").read_text())
    time.sleep(0.5)
    assert not os.path.exists(f"/proc/{pid0}") or "zombie" in open(f"/proc/{pid0}/status").read().lower()
