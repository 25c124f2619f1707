"""Device mesh from config: axes (data, fsdp, tensor), one of them may be -1 (fills).

The same code runs on one CPU (1x1x1), 8 fake devices and a TPU pod; only the
numbers in `config.mesh` change.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from clue_jax.errors import UserInputError

AXES = ("data", "fsdp", "tensor")


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills a single -1 so the product equals the device count."""
    shape = list(shape)
    if len(shape) != len(AXES):
        raise UserInputError(f"mesh.shape={shape} must have {len(AXES)} entries for axes {AXES}")
    if shape.count(-1) > 1:
        raise UserInputError(f"mesh.shape={shape}: at most one entry may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise UserInputError(f"mesh.shape={shape} does not divide the {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise UserInputError(f"mesh.shape={shape} needs {math.prod(shape)} devices, found {num_devices}")
    return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    resolved = resolve_shape(shape, len(devices))
    # Auto axes: shardings are given to jit explicitly (in/out_shardings), the
    # classic pjit model, rather than carried in types.
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return Mesh(np.asarray(devices).reshape(resolved), AXES, axis_types=auto)
