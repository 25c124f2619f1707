"""The collectives of a compiled program, read from its optimized HLO text.

What a sharded step communicates is decided by XLA's partitioner, not by the
code that asks for it: a missing sharding pin shows up as an all-reduce of an
activation where an all-gather of a weight was meant. Reading the compiled
program (`jax.jit(...).lower(...).compile().as_text()`) is how the scale plan
reports it and how the tests hold it.
"""
from __future__ import annotations

import math
import re

OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
# `%name = <result type> <op>(` or `<op>-start(`; the result type is one array or a tuple of them.
_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.*?)\s+(?P<op>" + "|".join(OPS)
                   + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def collectives(hlo_text: str) -> list[dict]:
    """Every collective of the program: op, dtype and per-device shape of each result array, and its bytes."""
    found = []
    for line in hlo_text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        arrays = [(dtype, dims) for dtype, dims in _ARRAY.findall(match["type"]) if dtype in _BYTES]
        if match["start"] and match["op"] != "all-reduce":  # async (operands, results): the results
            arrays = arrays[len(arrays) // 2:]
        for dtype, dims in arrays:
            shape = [int(d) for d in dims.split(",") if d]
            found.append({"op": match["op"], "dtype": dtype, "shape": shape,
                          "bytes": math.prod(shape) * _BYTES[dtype]})
    return found


def largest(found: list[dict], ops=("all-reduce", "all-gather")) -> dict:
    """The largest collective of each op in `ops` (None where there is none): the scale plan's summary."""
    return {op: max((c for c in found if c["op"] == op), key=lambda c: c["bytes"], default=None) for op in ops}
