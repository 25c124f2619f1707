"""Device mesh from config: axes (data, fsdp, tensor), one of them may be -1 (fills).

The same code runs on one CPU (1x1x1), 8 fake devices, a TPU pod and a GPU
cluster; only the numbers in `config.mesh` change.

Placement: the last axis varies fastest, so `tensor` (the most communication
per step) stays inside one slice / node, `fsdp` comes next and `data` is the
outermost. Devices are grouped into granules -- TPU slices, or GPU nodes (XLA
gives the GPUs of one host one `slice_index`), or processes where devices carry
no slice index (CPU). One granule: `mesh_utils.create_device_mesh` lays the
shape out on the physical topology. Several: `create_hybrid_device_mesh`, with
`mesh.dcn_shape` saying how many granules each axis spans over the data-center
network; by default the granules go to `data` first, then `fsdp`, then `tensor`.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from clue_jax.errors import UserInputError

AXES = ("data", "fsdp", "tensor")
# jax.make_mesh splits physical axes on these chips (their 2D torus rarely fits a 3-axis shape otherwise).
_SPLIT_PHYSICAL = ("TPU v5 lite", "TPU v5e")


def resolve_shape(shape: Sequence[int], num_devices: int, key: str = "mesh.shape",
                  unit: str = "devices") -> tuple[int, ...]:
    """Fills a single -1 so the product equals `num_devices` (of `unit`: devices, or slices/nodes)."""
    shape = list(shape)
    if len(shape) != len(AXES) or any(s == 0 or s < -1 for s in shape):
        raise UserInputError(f"{key}={tuple(shape)} must be {len(AXES)} positive sizes (or one -1) for axes {AXES}")
    if shape.count(-1) > 1:
        raise UserInputError(f"{key}={tuple(shape)}: at most one entry may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise UserInputError(f"{key}={tuple(shape)} does not divide the {num_devices} {unit}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise UserInputError(f"{key}={tuple(shape)} needs {math.prod(shape)} {unit}, found {num_devices}")
    return tuple(shape)


def _granules(devices) -> tuple[str, list[list]]:
    """The devices grouped by slice (TPU slice, GPU node) or, on CPUs and without slice indices, by process."""
    by_slice = all(hasattr(d, "slice_index") for d in devices) and devices[0].platform != "cpu"
    attr = "slice_index" if by_slice else "process_index"
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(getattr(d, attr), []).append(d)
    return attr, [groups[k] for k in sorted(groups)]


def _default_dcn(shape: Sequence[int], num_granules: int) -> tuple[int, ...]:
    """Granules to the outermost axes first: data, then fsdp, then tensor."""
    dcn, left = [], num_granules
    for size in shape:
        dcn.append(math.gcd(left, size))
        left //= dcn[-1]
    if left != 1:
        raise UserInputError(f"mesh.shape={tuple(shape)} cannot be split over {num_granules} slices/nodes; "
                             f"set mesh.dcn_shape")
    return tuple(dcn)


def device_array(shape: Sequence[int], devices, dcn_shape: Sequence[int] = ()) -> np.ndarray:
    """The devices as an array of the resolved `shape`, placed by topology (see the module docstring).

    Works on anything with the attributes jax devices have (id, platform, device_kind, process_index,
    slice_index), so placement is testable with fake devices.
    """
    devices = list(devices)
    resolved = resolve_shape(shape, len(devices))
    attr, granules = _granules(devices)
    if dcn_shape:
        dcn = resolve_shape(dcn_shape, len(granules), key="mesh.dcn_shape", unit="slices/nodes")
    else:
        dcn = _default_dcn(resolved, len(granules))
    if any(s % d for s, d in zip(resolved, dcn)):
        raise UserInputError(f"mesh.dcn_shape={dcn} does not divide mesh.shape={resolved} axis by axis")
    inner = tuple(s // d for s, d in zip(resolved, dcn))
    sizes = sorted({len(g) for g in granules})
    if sizes != [math.prod(inner)]:
        raise UserInputError(f"mesh.shape={resolved} over mesh.dcn_shape={dcn} needs {math.prod(inner)} devices "
                             f"in each of {len(granules)} slices/nodes, found {sizes} ({len(devices)} devices)")
    split = devices[-1].device_kind in _SPLIT_PHYSICAL
    if len(granules) == 1:
        return mesh_utils.create_device_mesh(resolved, devices, allow_split_physical_axes=split)
    return mesh_utils.create_hybrid_device_mesh(inner, dcn, devices, process_is_granule=attr == "process_index",
                                                allow_split_physical_axes=split)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None, dcn_shape: Sequence[int] = ()) -> Mesh:
    array = device_array(shape, jax.devices() if devices is None else devices, dcn_shape)
    # Auto axes: shardings are given to jit explicitly (in/out_shardings), the
    # classic pjit model, rather than carried in types.
    return Mesh(array, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def check_batches(config, mesh: Mesh) -> None:
    """Every training batch (`<section>.batch_size`, with its micro_batches) and `clues.score_batch` must
    split evenly over data*fsdp: refused here, before any stage runs, rather than in the middle of a run."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    where = f"data*fsdp={ways} of mesh.shape={tuple(mesh.devices.shape)} on {mesh.devices.size} devices"
    for name, section in config.items():
        if hasattr(section, "get") and "batch_size" in section and "micro_batches" in section:
            micro = section.micro_batches
            if section.batch_size % (ways * micro):
                times = f" times {name}.micro_batches={micro}" if micro > 1 else ""
                raise UserInputError(f"{name}.batch_size={section.batch_size} is not divisible by {where}{times}")
    score_batch = config.get("clues", {}).get("score_batch")
    if score_batch is not None and score_batch % ways:
        raise UserInputError(f"clues.score_batch={score_batch} is not divisible by {where}")


def from_config(config, devices=None) -> Mesh:
    """The run's mesh from `config.mesh` (shape, optional dcn_shape), with its batches checked."""
    mesh = make_mesh(tuple(config.mesh.shape), devices, tuple(config.mesh.get("dcn_shape") or ()))
    check_batches(config, mesh)
    return mesh
