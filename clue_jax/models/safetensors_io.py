"""safetensors files and HF checkpoint directories: which file holds which tensor, reading slices of a
tensor from a local or a remote (gs://, s3://, az:// through fsspec) file, and writing a file a tensor at a time.

Local files are memory-mapped (`safe_open(...).get_slice`). A remote file is
never copied: its header (a little-endian u64 length, then JSON with each
tensor's dtype, shape and byte offsets) is read once, and a slice is one
ranged read of the rows (first dimension) it spans; the columns are cut in
memory. Rows already read for one slice serve the others of the same rows,
so a host reads each row band its devices need once.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from clue_jax import workdir_fs as paths  # the one path layer (local or gs://, s3://, az://)
from clue_jax.errors import UserInputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors' dtype names (numpy dtype name -> header code).
ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int32": "I32", "int64": "I64"}

def read_config(directory: str) -> dict:
    file = paths.join(directory, "config.json")
    try:
        return json.loads(paths.read_text(file))
    except FileNotFoundError:
        raise UserInputError(f"{file}: not found (expected a Hugging Face model directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{file}: unreadable config ({e})") from None


def weight_files(directory: str | Path) -> dict[str, str]:
    """HF tensor name -> safetensors file. Like transformers: model.safetensors first, else the index."""
    directory = os.fspath(directory)
    single = paths.join(directory, SINGLE_FILE)
    if paths.exists(single):
        with contextlib.ExitStack() as stack:
            return {key: single for key in open_file(single, stack).keys()}
    index = paths.join(directory, INDEX_FILE)
    if not paths.exists(index):
        raise UserInputError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors is "
                             "supported)")
    try:
        weight_map = json.loads(paths.read_text(index))["weight_map"]
        return {str(key): paths.join(directory, str(name)) for key, name in weight_map.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserInputError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None


def open_file(file: str | Path, stack: contextlib.ExitStack):
    """A safetensors file's `keys()` and `get_slice(key)` (memory-mapped, or ranged reads of a URL); a bad header
    or a missing file names the file."""
    file = os.fspath(file)
    if paths.is_remote(file):
        return RemoteSafetensors(file)
    try:
        handle = safe_open(file, framework="numpy")
    except FileNotFoundError:
        raise UserInputError(f"{file}: not found") from None
    except Exception as e:  # safetensors raises SafetensorError, OSError, ValueError ...
        raise UserInputError(f"{file}: unreadable safetensors file ({type(e).__name__}: {e})") from None
    return stack.enter_context(handle)


_NUMPY_DTYPES = {code: np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
                 for name, code in ST_DTYPES.items()}


class RemoteSafetensors:
    """The header of a remote safetensors file, and `get_slice(key)` reading byte ranges of it."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.inner = paths.filesystem(url)
        with paths.remote_errors(url, "read"):
            size = int.from_bytes(self.fs.cat_file(self.inner, start=0, end=8), "little")
            blob = self.fs.cat_file(self.inner, start=8, end=8 + size)
        try:
            header = json.loads(blob)
            header.pop("__metadata__", None)
            self.entries = {k: (_NUMPY_DTYPES[v["dtype"]], tuple(v["shape"]), v["data_offsets"])
                            for k, v in header.items()}
        except (ValueError, KeyError, TypeError) as e:
            raise UserInputError(f"{url}: unreadable safetensors file ({type(e).__name__}: {e})") from None
        self.data_start = 8 + size

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_slice(self, key: str) -> "RemoteSlice":
        return RemoteSlice(self, key)


class RemoteSlice:
    """`tensor[idx]` of one remote tensor: the rows idx spans in one ranged read (kept for the other slices of
    the same rows), then the other dimensions cut in memory."""

    def __init__(self, file: RemoteSafetensors, key: str):
        self.file, self.key = file, key
        self.dtype, self.shape, (self.begin, _) = file.entries[key]
        self.bands: dict[tuple[int, int], np.ndarray] = {}

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, idx) -> np.ndarray:
        idx = idx if isinstance(idx, tuple) else (idx,)
        idx = tuple(s.indices(n) for s, n in zip(idx, self.shape))
        if not self.shape:
            return self._rows(0, 1).reshape(())
        first, stop, step = idx[0] if idx else (0, self.shape[0], 1)
        band = self._rows(first, stop)
        return band[(slice(0, stop - first, step),) + tuple(slice(*s) for s in idx[1:])]

    def _rows(self, first: int, stop: int) -> np.ndarray:
        if (first, stop) not in self.bands:
            row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
            start = self.file.data_start + self.begin + first * row_bytes
            with paths.remote_errors(self.file.url, "read"):
                blob = self.file.fs.cat_file(self.file.inner, start=start, end=start + (stop - first) * row_bytes)
            rows = np.frombuffer(blob, self.dtype)
            self.bands[(first, stop)] = rows.reshape((stop - first,) + self.shape[1:]) if self.shape else rows
        return self.bands[(first, stop)]


class SafetensorsStream:
    """Writes one safetensors file a tensor at a time.

    safetensors' own writers (save_file, serialize_file) take every tensor of a
    file in memory at once; a shard of a large model would then sit whole on
    one host. The format is a little-endian u64 header length, a JSON header
    (dtype, shape, byte offsets; padded to 8 bytes), then the raw tensors in
    offset order, so the header can be written from the shapes before any
    tensor exists, and each tensor is appended and released as it arrives.
    enabled=False (processes other than 0) writes nothing.
    """

    def __init__(self, file: str | Path, entries: list[tuple[str, np.dtype, tuple]], enabled: bool):
        self.entries, self.next, self.file = entries, 0, None
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, dtype, shape in entries:
            size = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": ST_DTYPES[dtype.name], "shape": list(shape),
                           "data_offsets": [offset, offset + size]}
            offset += size
        if enabled:
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            self.file = open(file, "wb")
            self.file.write(len(blob).to_bytes(8, "little") + blob)

    def write(self, key: str, array: np.ndarray) -> None:
        name, dtype, shape = self.entries[self.next]
        if (key, np.dtype(array.dtype), tuple(array.shape)) != (name, dtype, shape):
            raise ValueError(f"tensor {key} {array.dtype}{list(array.shape)} out of order or not as planned")
        self.next += 1
        if self.file is not None:
            self.file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)  # bf16 has no buffer format

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
        if exc[0] is None and self.next != len(self.entries):
            raise ValueError(f"{len(self.entries) - self.next} planned tensors were not written")



def plan_shards(sizes: dict[str, int], max_shard_bytes: int | None) -> list[list[str]]:
    """HF keys in name order, cut into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(sizes):
        if max_shard_bytes and shards[-1] and size + sizes[key] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += sizes[key]
    return shards


def to_host(x: jax.Array) -> np.ndarray:
    """Whole array on this host; arrays spread over several hosts are all-gathered."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
