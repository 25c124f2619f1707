"""A fake gs:// backed by a local directory, for tests that drive a gs:// workdir through the real code.

`install(root)` makes every gs://BUCKET/PATH reach ROOT/BUCKET/PATH through the same libraries a real bucket
goes through: fsspec's "gs"/"gcs" protocol (what etils.epath and clue_jax.workdir_fs ask for; gcsfs in real use) is a
directory filesystem that, like GCS, cannot append; orbax's TensorStore arrays use TensorStore's `file` driver
instead of its `gcs` driver, and orbax's bucket lookup (google-cloud-storage, for hierarchical namespaces) says
"flat bucket". `guard_local_gs()` makes any local open/mkdir of a path containing "gs:" raise -- what a gs://
URL that went through os.path.abspath or open() would write.
"""
import builtins
import os
import types

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class FakeGCS(DirFileSystem):
    protocol = ("gs", "gcs")
    root = None

    def __init__(self, *args, **kwargs):
        super().__init__(path=FakeGCS.root, fs=LocalFileSystem(auto_mkdir=True))

    def open(self, path, mode="rb", *args, **kwargs):
        if "a" in mode:
            raise NotImplementedError(f"{path}: a GCS object cannot be appended to")
        return super().open(path, mode, *args, **kwargs)


def install(root: str) -> None:
    FakeGCS.root = os.path.abspath(root)
    os.makedirs(FakeGCS.root, exist_ok=True)
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    from orbax.checkpoint._src.path import gcs_utils

    def file_kvstore(ckpt_path: str) -> dict:
        bucket, inner = gcs_utils.parse_gcs_path(ckpt_path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(FakeGCS.root, bucket, inner)}

    gcs_utils.get_kvstore_for_gcs = file_kvstore
    gcs_utils.get_bucket = lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False)


def guard_local_gs() -> None:
    _open, _os_open, _makedirs, _mkdir = builtins.open, os.open, os.makedirs, os.mkdir

    def check(path):
        if isinstance(path, (str, os.PathLike)) and "gs:" in os.fspath(path):
            raise AssertionError(f"a gs:// path reached the local disk: {os.fspath(path)}")

    def fake_open(file, *args, **kwargs):
        check(file)
        return _open(file, *args, **kwargs)

    def fake_os_open(path, *args, **kwargs):
        check(path)
        return _os_open(path, *args, **kwargs)

    def fake_makedirs(name, *args, **kwargs):
        check(name)
        return _makedirs(name, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        check(path)
        return _mkdir(path, *args, **kwargs)

    builtins.open, os.open, os.makedirs, os.mkdir = fake_open, fake_os_open, fake_makedirs, fake_mkdir
