"""Mesh placement by topology: `tensor` inside a slice / node / process, `data` across them; bad meshes refused.

Multi-node layouts use fake device objects with the attributes mesh_utils reads (id, platform, device_kind,
process_index, slice_index): XLA gives the GPUs of one host one slice_index, TPU slices have their own, and
CPU devices carry none (their processes are the granules).
"""
import dataclasses
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from clue_jax.errors import UserInputError
from clue_jax.parallel import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    platform: str = "gpu"
    device_kind: str = "NVIDIA H100 80GB HBM3"


@dataclasses.dataclass(frozen=True)
class FakeSliceDevice(FakeDevice):
    slice_index: int = 0


def gpu_cluster(nodes, gpus, process_per_gpu=True):
    """nodes x gpus GPUs, listed in a shuffled order (placement must not depend on list order)."""
    devices = [FakeSliceDevice(id=n * gpus + g, process_index=n * gpus + g if process_per_gpu else n, slice_index=n)
               for n in range(nodes) for g in range(gpus)]
    return [devices[i] for i in np.random.default_rng(0).permutation(len(devices))]


def groups(array, axis, attr):
    """For every line of devices along `axis`: the set of `attr` values it spans."""
    lines = np.moveaxis(array, mesh_lib.AXES.index(axis), -1).reshape(-1, array.shape[mesh_lib.AXES.index(axis)])
    return [{getattr(d, attr) for d in line} for line in lines]


@pytest.mark.parametrize("shape", [(1, 8, 2), (2, 4, 2), (2, 8, 1), (1, 2, 8), (-1, 4, 2)])
def test_two_gpu_nodes_keep_each_tensor_group_on_one_node(shape):
    array = mesh_lib.device_array(shape, gpu_cluster(2, 8))
    assert all(len(g) == 1 for g in groups(array, "tensor", "slice_index"))
    assert sorted(d.id for d in array.flat) == list(range(16))


@pytest.mark.parametrize("shape", [(2, 4, 2), (2, 8, 1)])
def test_data_goes_across_nodes_and_fsdp_stays_inside_one(shape):
    array = mesh_lib.device_array(shape, gpu_cluster(2, 8))
    assert [len(g) for g in groups(array, "data", "slice_index")] == [2] * (16 // 2)
    assert all(len(g) == 1 for g in groups(array, "fsdp", "slice_index"))
    for d_index in range(2):  # data row i is node i
        assert {d.slice_index for d in array[d_index].flat} == {d_index}


def test_batch_8_on_16_gpus_spreads_fsdp_over_both_nodes_half_each():
    array = mesh_lib.device_array((1, 8, 2), gpu_cluster(2, 8))
    fsdp = array[0, :, 0]
    assert [d.slice_index for d in fsdp] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_dcn_shape_puts_fsdp_across_nodes_instead():
    array = mesh_lib.device_array((2, 4, 2), gpu_cluster(2, 8), dcn_shape=(1, 2, 1))
    assert all(len(g) == 1 for g in groups(array, "data", "slice_index"))  # data inside a node now
    assert all(len(g) == 2 for g in groups(array, "fsdp", "slice_index"))
    assert all(len(g) == 1 for g in groups(array, "tensor", "slice_index"))


def test_one_process_per_node_gives_the_same_placement():
    per_gpu = mesh_lib.device_array((2, 4, 2), gpu_cluster(2, 8))
    per_node = mesh_lib.device_array((2, 4, 2), gpu_cluster(2, 8, process_per_gpu=False))
    assert [d.id for d in per_gpu.flat] == [d.id for d in per_node.flat]
    assert all(len(g) == 1 for g in groups(per_node, "fsdp", "process_index"))


def test_tpu_slices_are_granules():
    """Two slices of 4 chips (multi-slice over DCN): each slice holds one data row by default."""
    devices = [FakeSliceDevice(id=i, process_index=i // 2, slice_index=i // 4, platform="tpu-like",
                               device_kind="fake") for i in range(8)]
    array = mesh_lib.device_array((2, 2, 2), devices)
    assert [{d.slice_index for d in array[i].flat} for i in range(2)] == [{0}, {1}]
    assert all(len(g) == 1 for g in groups(array, "tensor", "process_index"))


@pytest.mark.parametrize("kind", [FakeDevice, FakeSliceDevice])  # multi-process CPU devices say slice_index 0
def test_processes_are_granules_on_cpus(kind):
    devices = [kind(id=i, process_index=i // 2, platform="cpu", device_kind="cpu") for i in range(8)]
    for shape in [(2, 2, 2), (1, 4, 2), (4, 2, 1), (1, 1, 8), (8, 1, 1)]:
        array = mesh_lib.device_array(shape, devices)
        inner = "tensor" if shape[2] > 1 else "fsdp" if shape[1] > 1 else "data"
        spans = -(-shape[mesh_lib.AXES.index(inner)] // 2)  # 2 devices per process
        assert all(len(g) == spans for g in groups(array, inner, "process_index")), shape
        # Processes own contiguous blocks in list order, so the hybrid layout equals the old reshape.
        assert [d.id for d in array.flat] == list(range(8)), shape


@pytest.mark.parametrize("shape", [(2, 2, 2), (-1, 1, 1), (1, 2, 4), (1, 1, 1)])
def test_real_cpu_devices(shape):
    devices = jax.devices() if shape != (1, 1, 1) else jax.devices()[:1]
    m = mesh_lib.make_mesh(shape, devices)
    assert m.axis_names == mesh_lib.AXES and m.devices.size == len(devices)
    assert [d.id for d in m.devices.flat] == [d.id for d in devices]  # one process: list order, as before


@pytest.mark.parametrize("shape,dcn,message", [
    ((3, 1, 1), (), "mesh.shape=(3, 1, 1) needs 3 devices, found 16"),
    ((3, -1, 1), (), "mesh.shape=(3, -1, 1) does not divide the 16 devices"),
    ((-1, -1, 1), (), "at most one entry may be -1"),
    ((8, 2), (), "must be 3 positive sizes"),
    ((0, 8, 2), (), "must be 3 positive sizes"),
    ((2, 4, 2), (4, 1, 1), "mesh.dcn_shape=(4, 1, 1) needs 4 slices/nodes, found 2"),
    ((1, 8, 2), (2, 1, 1), "mesh.dcn_shape=(2, 1, 1) does not divide mesh.shape=(1, 8, 2) axis by axis"),
])
def test_bad_meshes_are_refused_in_one_line(shape, dcn, message):
    with pytest.raises(UserInputError) as err:
        mesh_lib.device_array(shape, gpu_cluster(2, 8), dcn)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_uneven_nodes_are_refused():
    devices = gpu_cluster(2, 8)[:12]  # a node short of GPUs
    with pytest.raises(UserInputError, match=r"needs \d+ devices in each of 2 slices/nodes"):
        mesh_lib.device_array((1, 6, 2), devices)


def _config(shape, batch=8, micro=1, score_batch=8):
    return ml_collections.ConfigDict(dict(
        mesh=dict(shape=shape, dcn_shape=()),
        cpt=dict(batch_size=batch, micro_batches=micro, steps=1),
        clues=dict(score_batch=score_batch)))


def test_batches_must_split_over_data_and_fsdp():
    mesh_lib.from_config(_config((2, 2, 2)))  # 8 over data*fsdp=4: fine
    cases = [(_config((-1, 1, 1), batch=4), "cpt.batch_size=4 is not divisible by data*fsdp=8"),
             (_config((2, 2, 2), micro=4), "cpt.batch_size=8 is not divisible by data*fsdp=4 of mesh.shape=(2, 2, 2)"
                                          " on 8 devices times cpt.micro_batches=4"),
             (_config((1, 8, 1), score_batch=4), "clues.score_batch=4 is not divisible by data*fsdp=8")]
    for config, message in cases:
        with pytest.raises(UserInputError) as err:
            mesh_lib.from_config(config)
        assert message in str(err.value) and "8 devices" in str(err.value) and "mesh.shape=" in str(err.value)


@pytest.mark.parametrize("override,message", [
    ("--config.mesh.shape=(3,1,1)", "error: mesh.shape=(3, 1, 1) needs 3 devices, found 4"),
    ("--config.mesh.shape=(1,4,1)", "error: cpt.batch_size=2 is not divisible by data*fsdp=4 of mesh.shape=(1, 4, 1)"
                                    " on 4 devices"),
])
def test_cli_refuses_a_bad_mesh_with_exit_2_before_writing(tmp_path, override, message):
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "clue_jax.main", "--config", f"{ROOT}/configs/quickstart.py:tiny",
                           "--workdir", str(workdir), "--config.cpt.batch_size=2", override],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-2000:]
    assert not (workdir / "stages").exists()


_TWO_PROCESS = """
import sys, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from clue_jax.parallel import mesh
for shape in [(1, 2, 2), (4, 1, 1), (1, 1, 4)]:
    print(shape, [d.process_index for d in mesh.make_mesh(shape).devices.flat], flush=True)
"""


def test_two_real_processes_are_the_granules():
    """2 processes x 2 CPU devices through jax.distributed: the hybrid mesh over processes, tensor pairs local."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS, f"127.0.0.1:{port}", str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.splitlines() == ["(1, 2, 2) [0, 0, 1, 1]", "(4, 1, 1) [0, 0, 1, 1]", "(1, 1, 4) [0, 0, 1, 1]"]
