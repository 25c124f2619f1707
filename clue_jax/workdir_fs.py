"""The workdir's files, local or in a bucket (gs://, s3://, az://), through etils.epath.

Every stage output (records, configs, jsonl, npz, reports, plots) goes through
these whole-object calls: locally a write is a temporary file renamed into
place (a crash never leaves half a file); in a bucket it is one put when the
write ends (object stores have no rename and no append). epath is what orbax
uses for the checkpoints, so both see the same filesystem (gcsfs for gs://).

Writers that need a real local file -- TensorBoard's event writer, the
appended metrics.jsonl, a tokenizer's save_pretrained -- write into a
`LocalMirror`: the directory itself when local, else a per-process scratch
directory whose new or changed files are uploaded whole on `upload()`.

Schemes epath does not know (memory://, http://) are refused: epath would
take them for a local path and write below a directory named "memory:".
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import uuid

import numpy as np
from etils import epath

from clue_jax.errors import UserInputError
from clue_jax.paths import remote_errors

SCHEMES = ("gs://", "s3://", "az://")


def is_remote(p) -> bool:
    return os.fspath(p).startswith(SCHEMES)


def path(p) -> epath.Path:
    """An absolute local path, or a bucket path as given; other URLs are refused with one line."""
    text = os.fspath(p)
    if is_remote(text):
        return epath.Path(text)
    if "://" in text:
        raise UserInputError(f"{text}: a workdir path must be local or start with {', '.join(SCHEMES)}")
    return epath.Path(os.path.abspath(text))


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
        if not is_remote(self.remote):
            return
        for dirpath, _, files in os.walk(self.local):
            for name in sorted(files):
                local = os.path.join(dirpath, name)
                rel = os.path.relpath(local, self.local).replace(os.sep, "/")
                version = _version(local)
                if self._sent.get(rel) != version:
                    with open(local, "rb") as f:
                        write_bytes(self.remote / rel, f.read())
                    self._sent[rel] = version

    def close(self) -> None:
        """Uploads what is left and removes the scratch copy."""
        self.upload()
        if is_remote(self.remote):
            shutil.rmtree(self.local, ignore_errors=True)


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
