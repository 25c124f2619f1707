"""Bucket paths for HF checkpoint directories and export's --out (clue_jax.workdir_fs).

A bucket is stood in for by tests/workers/fake_gcs.py: gs:// served from a
local directory through the same libraries (epath, fsspec) a real bucket
goes through; only the backend differs (gcsfs in real use, not installed
here). An unreachable bucket URL must fail at once with one line that names
it, and a scheme epath cannot reach is refused.
"""
import os
import subprocess
import sys
import time
import uuid

import fsspec
import jax
import numpy as np
import pytest
from flax import nnx

from clue_jax import export
from clue_jax import workdir_fs as paths
from clue_jax.data.tokenizer import train_bpe_tokenizer
from clue_jax.errors import UserInputError
from clue_jax.models import config as model_config
from clue_jax.models import factory, hf
from clue_jax.pipelines.stages import Stages
from clue_jax.models.safetensors_io import RemoteSafetensors
from clue_jax.parallel.mesh import make_mesh

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))
import fake_gcs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = model_config.llama(vocab_size=300, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                         max_len=32, rope_theta=10000.0)
IDS = np.arange(3, 27, dtype=np.int32).reshape(2, 12)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLUE_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def bucket(gcs_root):
    """A fresh gs:// bucket of the fake (a directory below gcs_root)."""
    return f"gs://bucket-{uuid.uuid4().hex[:8]}"


def _logits(model):
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, IDS))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A local HF directory (weights in two shards + index, tokenizer) and its model's logits."""
    path = tmp_path_factory.mktemp("hf")
    model = factory.create(CFG, 0, make_mesh((1, 1, 1), jax.devices()[:1]))
    hf.save(model, CFG, path, max_shard_bytes=30_000)
    train_bpe_tokenizer(["a small tokenizer for a small model"] * 5, 300, path)
    return path, _logits(model)


def test_load_an_hf_directory_from_a_url_through_the_cache(checkpoint, bucket, cache):
    local, expected = checkpoint
    paths.upload_dir(str(local), f"{bucket}/ckpt")
    url = f"{bucket}/ckpt"
    assert factory.is_hf_directory(url)
    model, cfg = factory.load_params(url, make_mesh((1, 2, 1), jax.devices()[:2]))
    assert cfg == CFG
    np.testing.assert_allclose(_logits(model), expected, atol=1e-6)
    assert hf.load_tokenizer(url)("small")["input_ids"] == hf.load_tokenizer(local)("small")["input_ids"]
    (copy,) = os.listdir(cache / "remote")
    cached = cache / "remote" / copy
    # the tokenizer's and config's files are cached; the weights are read in place, never copied
    assert sorted(f for f in os.listdir(cached) if not f.startswith(".")) == sorted(
        f for f in os.listdir(local) if not f.endswith(".safetensors"))

    # Unchanged remote files are not copied again; a changed one is; one gone remotely goes from the cache.
    mtimes = {f: os.stat(cached / f).st_mtime_ns for f in os.listdir(cached)}
    time.sleep(0.01)
    fs, inner = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{inner}/extra.txt", b"v1")
    assert paths.local_dir(url) == str(cached)
    assert all(os.stat(cached / f).st_mtime_ns == t for f, t in mtimes.items() if not f.startswith("."))
    time.sleep(0.01)
    fs.pipe_file(f"{inner}/extra.txt", b"v2, longer")
    paths.local_dir(url)
    assert (cached / "extra.txt").read_text() == "v2, longer"
    fs.rm_file(f"{inner}/extra.txt")
    paths.local_dir(url)
    assert not (cached / "extra.txt").exists()


def test_a_gs_checkpoint_is_read_in_place_each_byte_once(checkpoint, tmp_path, cache, monkeypatch):
    """A gs:// checkpoint (the fake bucket) loads onto 2 devices by ranged reads: every weight byte read once
    (a host reads only its devices' rows, never the whole file), no shard copied to the local cache."""
    monkeypatch.setattr(fake_gcs.FakeGCS, "root", str(tmp_path / "gcs"))
    for name in ("gs", "gcs"):  # for this test only: later ones find no gcsfs
        monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, name, fake_gcs.FakeGCS)
    local, expected = checkpoint
    url = "gs://ckpts/llama"
    paths.upload_dir(str(local), url)
    read = []
    cat_file = fake_gcs.FakeGCS.cat_file

    def counted(self, path, start=None, end=None, **kw):
        data = cat_file(self, path, start=start, end=end, **kw)
        read.append((os.path.basename(path), len(data)))
        return data

    monkeypatch.setattr(fake_gcs.FakeGCS, "cat_file", counted)
    model, cfg = factory.load_params(url, make_mesh((1, 2, 1), jax.devices()[:2]))
    np.testing.assert_allclose(_logits(model), expected, atol=1e-6)
    shards = sorted(f for f in os.listdir(local) if f.endswith(".safetensors"))
    assert len(shards) > 1  # the index and several files
    per_file = {f: sum(n for name, n in read if name == f) for f in shards}
    assert per_file == {f: os.path.getsize(local / f) for f in shards}  # header + every tensor, each byte once
    assert not [f for _, _, files in os.walk(cache) for f in files if f.endswith(".safetensors")]

    # one slice: its rows only
    read.clear()
    remote = RemoteSafetensors(f"{url}/{shards[0]}")
    key = next(k for k in remote.keys() if len(remote.entries[k][1]) == 2)
    dtype, shape, _ = remote.entries[key]
    rows = remote.get_slice(key)[1:3, 2:5]
    assert rows.shape == (2, 3) and read[-1][1] == 2 * shape[1] * dtype.itemsize
    from safetensors import safe_open

    with safe_open(str(local / shards[0]), framework="numpy") as f:
        np.testing.assert_array_equal(rows, f.get_slice(key)[1:3, 2:5])


def test_errors_in_a_remote_checkpoint_name_the_url(checkpoint, bucket):
    local, _ = checkpoint
    url = f"{bucket}/broken"
    paths.upload_dir(str(local), url)
    fs, inner = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{inner}/config.json", b'{"model_type": "llama"}')
    with pytest.raises(UserInputError, match=rf"^{url}/config.json: missing required key 'vocab_size'$"):
        hf.load(url)
    with pytest.raises(UserInputError, match=rf"^{bucket}/nothing-here: not found"):
        paths.local_dir(f"{bucket}/nothing-here")


def test_export_to_a_url(checkpoint, bucket, tmp_path):
    """A stage whose model is an HF directory in the bucket, exported to the bucket."""
    local, expected = checkpoint
    workdir = str(tmp_path / "run")
    stages = Stages(workdir)
    stages.run("tokenizer", {}, lambda d: {"path": str(local)})
    paths.upload_dir(str(local), f"{bucket}/base")
    stage_model = str(tmp_path / "run" / "stages" / "cpt_s" / "model")
    stages.run("cpt_s", {}, lambda d: factory.save_params(
        factory.load_params(f"{bucket}/base", make_mesh((1, 1, 1), jax.devices()[:1]))[0], CFG, stage_model) or {
        "model_dir": os.path.relpath(stage_model, workdir)})  # a path relative to the workdir
    out = f"{bucket}/exported"
    export.export(workdir, "cpt_s", out, 30_000)
    names = set(paths.listdir(out))
    assert {"config.json", hf.INDEX_FILE, "tokenizer.json"} <= names
    model, _ = hf.load(out)
    np.testing.assert_allclose(_logits(model), expected, atol=1e-6)
    with pytest.raises(UserInputError, match=rf"--out {out} exists and is not empty"):
        export.export(workdir, "cpt_s", out, None)


def test_a_remote_base_model_is_fingerprinted_by_its_file_versions(checkpoint, bucket):
    """The pipelines rerun what depends on a base checkpoint when a file of it changes (foundations.path_fingerprint)."""
    from clue_jax.pipelines import foundations

    url = f"{bucket}/base"
    paths.upload_dir(str(checkpoint[0]), url)
    first = foundations.path_fingerprint(url)
    assert foundations.path_fingerprint(url + "/") == first
    time.sleep(0.01)
    paths.write_text(f"{url}/config.json", paths.read_text(f"{url}/config.json") + " ")
    assert foundations.path_fingerprint(url) != first


def test_paths_helpers(tmp_path):
    assert paths.absolute("gs://b/x") == "gs://b/x"
    assert paths.absolute("rel") == os.path.abspath("rel")
    assert paths.absolute("file:///tmp/x") == "/tmp/x"
    assert paths.join("gs://b/run/", "stages", "x") == "gs://b/run/stages/x"
    assert not paths.is_remote(tmp_path) and paths.is_remote("gs://b")
    assert paths.listdir(tmp_path / "missing") == []
    for url in ("memory://b/x", "http://host/x"):  # one meaning of remote: what epath (and orbax) can reach
        assert not paths.is_remote(url)
        with pytest.raises(UserInputError, match=rf"^{url}: a path must be local or start with gs://"):
            paths.local_dir(url)


@pytest.mark.parametrize("url, error", [("s3://clue-jax-no-such-bucket/ckpt", r"cannot \w+ "),
                                        ("nosuchfs://somewhere/ckpt", "")])
def test_an_unreachable_url_fails_fast_with_one_line(url, error):
    """s3 (no backend installed here: gs:// may be the fake in this process; the CLI test below covers gs://)."""
    start = time.time()
    with pytest.raises(UserInputError, match=rf"^{error}{url}"):
        factory.load_params(url, make_mesh((1, 1, 1), jax.devices()[:1]))
    assert time.time() - start < 60


def test_export_cli_to_an_unreachable_gs_url(tmp_path):
    workdir = tmp_path / "run"

    def stage_with_a_model(d):
        os.makedirs(os.path.join(d, "model"))
        paths.write_text(os.path.join(d, "model", "model_config.json"), "{}")
        return {"model_dir": os.path.join(d, "model")}

    Stages(str(workdir)).run("cpt_s", {}, stage_with_a_model)
    Stages(str(workdir)).run("tokenizer", {}, lambda d: {"path": d})
    url = "gs://clue-jax-no-such-bucket/out"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "clue_jax.export", "--workdir", str(workdir), "--stage", "cpt_s",
                           "--out", url], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot ") and url in lines[0], proc.stderr
