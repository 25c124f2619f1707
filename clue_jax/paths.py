"""Paths that may be URLs (gs://, s3://, any fsspec filesystem) next to plain local paths.

Why fsspec directly rather than etils.epath: epath knows only gs/s3/az/hf,
and without TensorFlow it hands those to fsspec anyway (gcsfs for gs://).
Going through fsspec for every URL keeps one code path, which the tests
drive with fsspec's in-memory filesystem (`memory://`). Local paths never
touch fsspec.

Remote HF checkpoints' small files are read through a local cache
(tokenizers read local files; the weights are read in place by ranged reads,
clue_jax.models.safetensors_io): `local_dir` copies a remote directory, less
its *.safetensors, once per host into $CLUE_JAX_CACHE (default ~/.cache/clue_jax) and
copies a file again only when its remote version (`fs.ukey`: size, time,
etag) changed. Every failure of a remote filesystem -- a missing backend
(gcsfs not installed), no credentials, no network, a missing object --
becomes one UserInputError naming the URL.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid

from clue_jax.errors import UserInputError

_MANIFEST = ".clue_jax_source.json"
WEIGHT_SUFFIX = ".safetensors"  # read in place (clue_jax.models.safetensors_io), never copied by local_dir


def is_remote(path) -> bool:
    """True for a URL with a scheme other than file:// (gs://bucket/x, memory://x)."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def absolute(path) -> str:
    """os.path.abspath for local paths; URLs unchanged (there is no cwd in a bucket)."""
    text = os.fspath(path)
    return text if is_remote(text) else os.path.abspath(text.removeprefix("file://"))


def join(base, *parts: str) -> str:
    text = os.fspath(base)
    if is_remote(text):
        return "/".join([text.rstrip("/"), *parts])
    return os.path.join(text, *parts)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:300]}"


@contextlib.contextmanager
def remote_errors(url: str, doing: str):
    """Turns any error of a remote filesystem into one UserInputError naming the URL."""
    try:
        yield
    except UserInputError:
        raise
    except FileNotFoundError:
        raise UserInputError(f"{url}: not found") from None
    except Exception as err:  # ImportError (no gcsfs), auth, network, permissions ...
        raise UserInputError(f"cannot {doing} {url} ({_one_line(err)})") from None


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; a missing backend names the URL."""
    with remote_errors(url, "open"):
        import fsspec

        return fsspec.core.url_to_fs(url)


def exists(path) -> bool:
    text = os.fspath(path)
    if not is_remote(text):
        return os.path.exists(text)
    fs, inner = filesystem(text)
    with remote_errors(text, "reach"):
        return fs.exists(inner)


def listdir(path) -> list[str]:
    """Names of the entries of a directory ([] when it does not exist)."""
    text = os.fspath(path)
    if not is_remote(text):
        return sorted(os.listdir(text)) if os.path.isdir(text) else []
    fs, inner = filesystem(text)
    with remote_errors(text, "list"):
        if not fs.exists(inner):
            return []
        return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False)
                      if p.rstrip("/") != inner.rstrip("/"))


def read_text(path) -> str:
    text = os.fspath(path)
    if not is_remote(text):
        with open(text) as f:
            return f.read()
    fs, inner = filesystem(text)
    with remote_errors(text, "read"):
        return fs.cat_file(inner).decode()


def write_text(path, content: str) -> None:
    text = os.fspath(path)
    if not is_remote(text):
        with open(text, "w") as f:
            f.write(content)
        return
    fs, inner = filesystem(text)
    with remote_errors(text, "write"):
        fs.pipe_file(inner, content.encode())


def _file_versions(fs, url: str, inner: str) -> list[tuple[str, str]]:
    if not fs.isdir(inner):
        raise UserInputError(f"{url}: not found (expected a directory)")
    root = inner.rstrip("/")
    return [(f[len(root):].lstrip("/"), fs.ukey(f)) for f in sorted(fs.find(inner))]


def file_versions(url: str) -> list[tuple[str, str]]:
    """(relative name, version key) of every file below a remote directory: changes when any file does."""
    fs, inner = filesystem(url)
    with remote_errors(url, "list"):
        return _file_versions(fs, url, inner)


def cache_root() -> str:
    return os.environ.get("CLUE_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "clue_jax")


def local_dir(path) -> str:
    """A local directory holding the files of `path`: the path itself when local, else a cached copy.

    Every file below the remote directory but the weights is copied (HF
    checkpoints are flat: config, tokenizer files, the shards' index; the
    *.safetensors shards are read in place, never copied); each one is
    written to a temporary name and renamed, so processes sharing a host and a
    cache never see half a file.
    """
    text = os.fspath(path).rstrip("/")
    if not is_remote(text):
        return absolute(text)
    fs, inner = filesystem(text)
    with remote_errors(text, "read"):
        versions = _file_versions(fs, text, inner)
    local = os.path.join(cache_root(), "remote", hashlib.sha256(text.encode()).hexdigest()[:20])
    os.makedirs(local, exist_ok=True)
    manifest_path = os.path.join(local, _MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        manifest = {}
    versions = [(rel, key) for rel, key in versions if not rel.endswith(WEIGHT_SUFFIX)]
    seen = {rel for rel, _ in versions}
    with remote_errors(text, "read"):
        for rel, key in versions:
            remote_file = inner.rstrip("/") + "/" + rel
            target = os.path.join(local, rel)
            if manifest.get(rel) == key and os.path.exists(target):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.{uuid.uuid4().hex}.tmp"
            fs.get_file(remote_file, tmp)
            os.replace(tmp, target)
            manifest[rel] = key
    for rel in sorted(set(manifest) - seen):  # gone remotely (e.g. one file replaced by shards + index)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(local, rel))
        del manifest[rel]
    tmp = f"{manifest_path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, manifest_path)
    return local


def upload_dir(local: str, url: str) -> None:
    """Copies every file below the local directory `local` to the URL `url` (a directory)."""
    fs, inner = filesystem(url)
    with remote_errors(url, "write"):
        for dirpath, _, files in os.walk(local):
            for name in sorted(files):
                src = os.path.join(dirpath, name)
                rel = os.path.relpath(src, local).replace(os.sep, "/")
                fs.put_file(src, inner.rstrip("/") + "/" + rel)
