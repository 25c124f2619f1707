"""Files and directories that may live in a bucket (gs://, s3://, az://): the workdir, checkpoints given as
inputs, export's --out. One meaning of "remote": a URL with one of those schemes, which etils.epath (and so
orbax, for the checkpoints) reaches through fsspec (gcsfs for gs://); every other path is local.

Every stage output (records, configs, jsonl, npz, reports, plots) goes through
these whole-object calls: locally a write is a temporary file renamed into
place (a crash never leaves half a file); in a bucket it is one put when the
write ends (object stores have no rename and no append).

Writers that need a real local file -- TensorBoard's event writer, the
appended metrics.jsonl, a tokenizer's save_pretrained -- write into a
`LocalMirror`: the directory itself when local, else a per-process scratch
directory whose new or changed files are uploaded whole on `upload()`.
Readers that need local files (tokenizers read them) get a remote directory
through `local_dir`: copied once per host, less its *.safetensors (read in
place by ranged reads, clue_jax.models.safetensors_io), into $CLUE_JAX_CACHE
(default ~/.cache/clue_jax), a file again only when its remote version (size,
time, etag) changed.

Schemes epath does not know (memory://, http://) are refused with one line:
epath would take them for a local path and write below a directory named
"memory:". Every failure of a bucket -- a missing backend (gcsfs not
installed), no credentials, no network, a missing object -- becomes one
UserInputError naming the URL.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid

import numpy as np
from etils import epath

from clue_jax.errors import UserInputError

SCHEMES = ("gs://", "s3://", "az://")
_MANIFEST = ".clue_jax_source.json"
WEIGHT_SUFFIX = ".safetensors"  # read in place (clue_jax.models.safetensors_io), never copied by local_dir


def is_remote(p) -> bool:
    return os.fspath(p).startswith(SCHEMES)


def path(p) -> epath.Path:
    """An absolute local path (file:// stripped), or a bucket path as given; other URLs are refused with one line."""
    text = os.fspath(p)
    if is_remote(text):
        return epath.Path(text)
    text = text.removeprefix("file://")
    if "://" in text:
        raise UserInputError(f"{text}: a path must be local or start with {', '.join(SCHEMES)}")
    return epath.Path(os.path.abspath(text))


def absolute(p) -> str:
    """os.path.abspath for local paths; bucket URLs as given (there is no cwd in a bucket)."""
    return os.fspath(path(p))


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:300]}"


@contextlib.contextmanager
def remote_errors(url: str, doing: str):
    """Turns any error of a bucket's filesystem into one UserInputError naming the URL."""
    try:
        yield
    except UserInputError:
        raise
    except FileNotFoundError:
        raise UserInputError(f"{url}: not found") from None
    except Exception as err:  # ImportError (no gcsfs), auth, network, permissions ...
        raise UserInputError(f"cannot {doing} {url} ({_one_line(err)})") from None


def errors(target, doing: str):
    """A bucket's errors (no backend, no credentials, no network) as one line naming the path; local ones as raised."""
    return remote_errors(os.fspath(target), doing) if is_remote(target) else contextlib.nullcontext()


def join(base, *parts: str) -> str:
    return os.fspath(path(base).joinpath(*parts))


@contextlib.contextmanager
def open_write(p, mode: str = "w"):
    """A file object for the whole new content of `p` ("w" text, "wb" bytes); nothing appears before it ends."""
    target = path(p)
    if is_remote(target):
        buffer = io.BytesIO() if "b" in mode else io.StringIO()
        yield buffer
        data = buffer.getvalue()
        with errors(target, "write"):
            target.write_bytes(data if isinstance(data, bytes) else data.encode())
        return
    os.makedirs(target.parent, exist_ok=True)
    tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_text(p, text: str) -> None:
    with open_write(p) as f:
        f.write(text)


def write_bytes(p, data: bytes) -> None:
    with open_write(p, "wb") as f:
        f.write(data)


def read_text(p) -> str:
    target = path(p)
    with errors(target, "read"):
        return target.read_text()


def read_bytes(p) -> bytes:
    target = path(p)
    with errors(target, "read"):
        return target.read_bytes()


def exists(p) -> bool:
    target = path(p)
    with errors(target, "reach"):
        return target.exists()


def listdir(p) -> list[str]:
    """Names of the entries of a directory ([] when it does not exist)."""
    target = path(p)
    with errors(target, "list"):
        return sorted(child.name for child in target.iterdir()) if target.is_dir() else []


def append_line(p, line: str) -> None:
    """Adds one line to a small file (a bucket object is read and written back whole)."""
    target = path(p)
    if not is_remote(target):
        with open(target, "a") as f:
            f.write(line.rstrip("\n") + "\n")
        return
    old = read_text(target) if exists(target) else ""
    write_text(target, old + line.rstrip("\n") + "\n")


def rename(src, dst) -> None:
    """Moves a file or directory to a new name (in a bucket: copied, then deleted); dst's parent is created."""
    source, target = path(src), path(dst)
    with errors(source, "move"):
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)


def replace(src, dst) -> None:
    """Like rename, but an existing file `dst` is overwritten."""
    source, target = path(src), path(dst)
    with errors(source, "move"):
        source.replace(target)


def copytree(src, dst) -> None:
    """Copies a directory (e.g. a checkpoint step) file by file; local to local is shutil.copytree."""
    source, target = path(src), path(dst)
    if not is_remote(source) and not is_remote(target):
        shutil.copytree(source, target)
        return
    for root, _, files in source.walk():
        for name in files:
            rel = os.path.relpath(os.fspath(epath.Path(root) / name), os.fspath(source))
            write_bytes(target / rel, read_bytes(epath.Path(root) / name))


def rmtree(p) -> None:
    target = path(p)
    with errors(target, "delete"):
        if target.exists():
            target.rmtree()


def savefig(fig, p, **kwargs) -> None:
    """A matplotlib figure as one whole file, in the format its name ends with (.png, .pdf, .svg)."""
    with open_write(p, "wb") as f:
        fig.savefig(f, format=os.fspath(p).rsplit(".", 1)[-1], **kwargs)


def save_npz(p, **arrays) -> None:
    with open_write(p, "wb") as f:
        np.savez(f, **arrays)


def load_npz(p) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_bytes(p))) as data:
        return {k: data[k] for k in data.files}


_scratch_root: str | None = None


def _scratch() -> str:
    """This process's scratch directory (under $TMPDIR), removed when the process ends."""
    global _scratch_root
    if _scratch_root is None:
        import atexit

        _scratch_root = tempfile.mkdtemp(prefix="clue_jax_scratch_")
        atexit.register(shutil.rmtree, _scratch_root, True)
    return _scratch_root


class LocalMirror:
    """A local directory for writers that need local files; `upload()` copies new or changed files to `remote`.

    For a local `remote` it is that directory and upload does nothing. `download` names files (relative) to
    fetch first, so a writer that appends (metrics.jsonl) continues the bucket's copy instead of replacing it.
    """

    def __init__(self, remote, download: tuple[str, ...] = ()):
        self.remote = path(remote)
        self._sent: dict[str, tuple[int, int]] = {}
        if not is_remote(self.remote):
            self.local = os.fspath(self.remote)
            os.makedirs(self.local, exist_ok=True)
            return
        self.local = tempfile.mkdtemp(prefix="mirror_", dir=_scratch())
        for rel in download:
            source = self.remote / rel
            if exists(source):
                target = os.path.join(self.local, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(read_bytes(source))
                self._sent[rel] = _version(target)

    def upload(self) -> None:
        if is_remote(self.remote):
            _upload_changed(self.local, self.remote, self._sent)

    def close(self) -> None:
        """Uploads what is left and removes the scratch copy."""
        self.upload()
        if is_remote(self.remote):
            shutil.rmtree(self.local, ignore_errors=True)


def _upload_changed(local_dir_: str, remote: epath.Path, sent: dict[str, tuple[int, int]]) -> None:
    """Writes each file below `local_dir_` whose (size, mtime) is not the one in `sent` to `remote`; updates `sent`."""
    for dirpath, _, files in os.walk(local_dir_):
        for name in sorted(files):
            local = os.path.join(dirpath, name)
            rel = os.path.relpath(local, local_dir_).replace(os.sep, "/")
            version = _version(local)
            if sent.get(rel) != version:
                with open(local, "rb") as f:
                    write_bytes(remote / rel, f.read())
                sent[rel] = version


def _version(local: str) -> tuple[int, int]:
    st = os.stat(local)
    return st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def local_dir_for(remote):
    """A local directory whose files end up in `remote` when the block ends without error."""
    mirror = LocalMirror(remote)
    try:
        yield mirror.local
        mirror.upload()
    finally:
        if is_remote(mirror.remote):
            shutil.rmtree(mirror.local, ignore_errors=True)


# ------------------------------------------------------------------ remote inputs through a local cache
def filesystem(url: str):
    """(fsspec filesystem, path inside it): epath's own backend, asked for what epath does not expose
    (version keys, whole-file copies, ranged reads)."""
    path(url)  # refuses a scheme outside SCHEMES
    with remote_errors(url, "open"):
        import fsspec

        return fsspec.core.url_to_fs(url)


def _file_versions(fs, url: str, inner: str) -> list[tuple[str, str]]:
    if not fs.isdir(inner):
        raise UserInputError(f"{url}: not found (expected a directory)")
    root = inner.rstrip("/")
    return [(f[len(root):].lstrip("/"), fs.ukey(f)) for f in sorted(fs.find(inner))]


def file_versions(url: str) -> list[tuple[str, str]]:
    """(relative name, version key) of every file below a bucket directory: changes when any file does."""
    fs, inner = filesystem(url)
    with remote_errors(url, "list"):
        return _file_versions(fs, url, inner)


def cache_root() -> str:
    return os.environ.get("CLUE_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "clue_jax")


def local_dir(p) -> str:
    """A local directory holding the files of `p`: the path itself when local, else a cached copy.

    Every file below the bucket directory but the weights is copied (HF
    checkpoints are flat: config, tokenizer files, the shards' index; the
    *.safetensors shards are read in place, never copied); each one is
    written to a temporary name and renamed, so processes sharing a host and a
    cache never see half a file.
    """
    text = os.fspath(p).rstrip("/")
    if not is_remote(text):
        return absolute(text)
    fs, inner = filesystem(text)
    with remote_errors(text, "read"):
        versions = _file_versions(fs, text, inner)
    versions = [(rel, key) for rel, key in versions if not rel.endswith(WEIGHT_SUFFIX)]
    local = os.path.join(cache_root(), "remote", hashlib.sha256(text.encode()).hexdigest()[:20])
    os.makedirs(local, exist_ok=True)
    manifest_path = os.path.join(local, _MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        manifest = {}
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
    """Copies every file below the local directory `local` to the directory `url`."""
    _upload_changed(local, path(url), {})
