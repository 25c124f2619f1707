"""The model store: every saved model (causal LM, MCL pair) is checksummed at save and checked at every read;
a finished stage whose output is damaged is moved aside and run again; orbax write errors are one line."""
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx

from clue_jax.models import config as model_config
from clue_jax.models import encoder as E
from clue_jax.models import factory, orbax_errors, store
from clue_jax.mcl import pairs as mcl_pairs
from clue_jax.pipelines.stages import StageDamaged, Stages, rerun_damaged
from clue_jax.parallel.mesh import make_mesh

CFG = model_config.gpt2(vocab_size=64, d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=16)


def _mesh():
    return make_mesh((1, 1, 1), jax.devices()[:1])


def _tamper(directory, source):
    """`directory`'s arrays silently changed (as flipped bits that orbax reads back without complaint would):
    its params/ replaced by another model's, its checksums.json left as saved."""
    shutil.rmtree(directory / "params")
    shutil.copytree(source / "params", directory / "params")


def _doctor_checksum(directory):
    """One saved checksum off by one bit, the file's size kept: only reading the model can tell."""
    path = directory / store.CHECKSUMS
    size, sums = path.stat().st_size, json.loads(path.read_text())
    sums[min(sums)] ^= 1
    path.write_text(json.dumps(sums, indent=0, sort_keys=True))
    assert path.stat().st_size == size


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
    """A saved tiny LM (seed 0) and, beside it, the same architecture from seed 1."""
    root = tmp_path_factory.mktemp("lm")
    for seed in (0, 1):
        factory.save_params(factory.create(CFG, seed, _mesh()), CFG, str(root / f"seed{seed}"))
    return root / "seed0"


def test_causal_lm_round_trips_and_damage_is_refused_in_one_line(saved_lm, tmp_path):
    model, _ = factory.load_params(str(saved_lm), _mesh())
    np.testing.assert_array_equal(np.asarray(model.embed_tokens.embedding[...]),
                                  np.asarray(factory.create(CFG, 0, _mesh()).embed_tokens.embedding[...]))
    changed, unsummed = tmp_path / "changed", tmp_path / "unsummed"
    shutil.copytree(saved_lm, changed)
    shutil.copytree(saved_lm, unsummed)
    _tamper(changed, saved_lm.parent / "seed1")
    (unsummed / store.CHECKSUMS).unlink()
    for directory, why in ((changed, r"checksum mismatch in \d+ arrays, e\.g\. \['blocks'\]"),
                           (unsummed, "its checksums.json is missing")):
        with pytest.raises(store.DamagedModel, match=f"saved model {directory} is damaged: {why}") as err:
            factory.load_params(str(directory), _mesh())
        assert "\n" not in str(err.value) and err.value.directory == str(directory)


def test_checksums_are_checked_before_a_precision_cast(tmp_path):
    """A bfloat16 model read under "mixed" is restored as saved, checked, then cast to float32 masters."""
    bf16 = dataclasses.replace(CFG, dtype="bfloat16", param_dtype="bfloat16")
    factory.save_params(factory.create(bf16, 0, _mesh()), bf16, str(tmp_path))
    model, _ = factory.load_params(str(tmp_path), _mesh(), precision="mixed")
    assert model.embed_tokens.embedding[...].dtype == jax.numpy.float32
    _doctor_checksum(tmp_path)
    with pytest.raises(store.DamagedModel, match="checksum mismatch in 1 arrays"):
        factory.load_params(str(tmp_path), _mesh(), precision="mixed")


def test_mcl_pair_uses_the_same_store(tmp_path):
    cfg = E.EncoderConfig(vocab_size=64, hidden_size=16, embedding_size=16, num_layers=1, num_heads=2,
                          intermediate_size=32, max_len=16)
    mesh = _mesh()
    pair = mcl_pairs.create_pair(cfg, E.generator_config(cfg, 0.5), 0, mesh)
    mcl_pairs.save_pair(pair, str(tmp_path / "pair"))
    assert sorted(os.listdir(tmp_path / "pair")) == ["checksums.json", "pair_config.json", "params"]
    mcl_pairs._PAIRS.clear()  # read from disk, not from what this process saved
    again = mcl_pairs.load_pair(str(tmp_path / "pair"), mesh)
    for a, b in zip(jax.tree.leaves(nnx.state(again, nnx.Param)), jax.tree.leaves(nnx.state(pair, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _doctor_checksum(tmp_path / "pair")
    mcl_pairs._PAIRS.clear()
    with pytest.raises(store.DamagedModel, match=r"pair is damaged: checksum mismatch in 1 arrays"):
        mcl_pairs.load_pair(str(tmp_path / "pair"), mesh)


# ------------------------------------------------------------------ damaged finished stages
def _save_model_stage(calls, saved):
    """A stage that 'trains' the model saved in `saved` (a copy: the store's files as save_params wrote them)."""
    def fn(stage_dir):
        calls.append(stage_dir)
        shutil.copytree(saved, os.path.join(stage_dir, "model"))
        return {"model_dir": os.path.join(stage_dir, "model")}
    return fn


def _read_model_stage(model_dir):
    def fn(stage_dir):
        model, _ = factory.load_params(model_dir, _mesh())
        return {"sum": float(np.asarray(model.embed_tokens.embedding[...]).sum())}
    return fn


def test_finished_stage_missing_a_file_is_moved_aside_and_rerun(saved_lm, tmp_path, caplog):
    calls = []
    Stages(str(tmp_path)).run("pretrain", {"x": 1}, _save_model_stage(calls, saved_lm))
    (tmp_path / "stages" / "pretrain" / "model" / "model_config.json").unlink()
    with caplog.at_level("WARNING"):
        Stages(str(tmp_path)).run("pretrain", {"x": 1}, _save_model_stage(calls, saved_lm))
    assert len(calls) == 2
    assert "stage pretrain: its output is damaged (model/model_config.json is missing), running it again" \
        in caplog.text and "pretrain.damaged-1" in caplog.text
    assert (tmp_path / "stages" / "pretrain.damaged-1" / "done.json").exists()
    assert (tmp_path / "stages" / "pretrain" / "model" / "model_config.json").exists()


def test_damage_found_by_a_later_stage_reruns_the_stage_that_saved_it(saved_lm, tmp_path, caplog):
    calls = []

    def pipeline(second_inputs):
        stages = Stages(str(tmp_path))
        base = stages.run("pretrain", {"x": 1}, _save_model_stage(calls, saved_lm))
        return stages.run("cpt", {"lr": second_inputs, "base": base["_fingerprint"]},
                          _read_model_stage(base["model_dir"]))

    first = pipeline(1)
    _doctor_checksum(tmp_path / "stages" / "pretrain" / "model")  # same size: only the read can tell
    with caplog.at_level("WARNING"):
        again = rerun_damaged(lambda: pipeline(2))  # cpt reads the damaged model: pretrain is moved, both rerun
    assert len(calls) == 2 and again["sum"] == first["sum"]  # trained from the recomputed, sound model
    assert (tmp_path / "stages" / "pretrain.damaged-1" / "done.json").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    said = (r"stage cpt: saved model .*/stages/pretrain/model is damaged: .*; stage pretrain was moved aside to "
            r"\S+/stages/pretrain.damaged-1; running the pipeline again")
    assert any(re.fullmatch(said, w) for w in warnings), warnings


def test_damage_found_again_and_again_ends_in_one_line():
    tries = []

    def damaged():
        tries.append(1)
        raise StageDamaged("stage cpt: saved model m is damaged: x; stage pretrain was moved aside to p")

    with pytest.raises(StageDamaged, match="moved aside to p; rerun the same command to recompute it$"):
        rerun_damaged(damaged, attempts=2)
    assert len(tries) == 2


def test_damaged_model_outside_the_stages_is_the_users(saved_lm, tmp_path):
    damaged = tmp_path / "given"
    shutil.copytree(saved_lm, damaged)
    _tamper(damaged, saved_lm.parent / "seed1")
    with pytest.raises(store.DamagedModel):
        Stages(str(tmp_path / "w")).run("cpt", {}, _read_model_stage(str(damaged)))
    assert damaged.exists()


# ------------------------------------------------------------------ write errors
def test_tensorstore_write_errors_become_os_errors():
    text = ('RESOURCE_EXHAUSTED: Error writing "a/0.0" in OCDBT database at local file "/m/x/": Failed writing: '
            '"/m/x/d/7733": Failed to write 1705029 bytes to file 11: No space left on device [os_error_code=\'28\']')
    err = orbax_errors.os_error(ValueError(text), "/m/x")
    assert (err.errno, err.filename, err.strerror) == (errno.ENOSPC, "/m/x", os.strerror(errno.ENOSPC))
    assert orbax_errors.os_error(ValueError("PERMISSION_DENIED: open failed"), "/p").errno == errno.EACCES
    assert orbax_errors.os_error(ValueError("DATA_LOSS: bad block"), "/p") is None
    with pytest.raises(OSError) as raised, orbax_errors.write_errors("/m/x"):
        raise ValueError(text)
    assert raised.value.errno == errno.ENOSPC and "\n" not in str(raised.value)


def _small_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          check=False)
    return proc.returncode == 0


@pytest.mark.parametrize("kind", ["store", "checkpoint"])
def test_real_full_disk_is_one_os_error_and_keeps_what_was_saved(tmp_path, kind, caplog):
    """A 192 KiB tmpfs: a small save fits, a 1 MiB one does not; the small one stays readable."""
    from clue_jax.train.checkpoint import Checkpointer

    disk = tmp_path / "disk"
    if not _small_tmpfs(disk, "192k"):
        pytest.skip("mounting a small tmpfs needs root (mount -t tmpfs) and is not permitted here")
    small, big = nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(512, 512, rngs=nnx.Rngs(0))
    try:
        with caplog.at_level(logging.ERROR), pytest.raises(OSError) as err:
            if kind == "store":
                store.save(small, str(disk / "small"), {})
                store.save(big, str(disk / "big"), {})
            else:
                ckpt = Checkpointer(str(disk / "checkpoints"))
                try:
                    ckpt.save(1, nnx.to_pure_dict(nnx.state(small)), {"model": {}})
                    ckpt.wait()
                    ckpt.save(2, nnx.to_pure_dict(nnx.state(big)), {"model": {}})
                finally:
                    ckpt.close()
        assert err.value.errno == errno.ENOSPC and str(disk) in err.value.filename
        assert "Traceback" not in caplog.text and "RESOURCE_EXHAUSTED" not in caplog.text
        want = nnx.to_pure_dict(nnx.state(small))
        if kind == "store":
            got = nnx.to_pure_dict(store.restore(str(disk / "small"), store.abstract_like(nnx.state(small))))
        else:
            ckpt = Checkpointer(str(disk / "checkpoints"))
            step, got, _ = ckpt.restore_latest(store.abstract_like(want), {})
            ckpt.close()
            assert step == 1
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    finally:
        subprocess.run(["umount", str(disk)], check=True)
