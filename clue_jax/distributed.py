"""Multi-host start-up: jax.distributed on TPU pods, SLURM and explicit coordinators.

`auto` initialises only where a cluster is detected, so the same command works
on a laptop. On CPU (local multi-process tests) collectives use gloo.
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("clue_jax")

_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def cluster_detected() -> bool:
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False  # a single SLURM task needs no coordinator
    return any(os.environ.get(k) for k in _CLUSTER_ENV)


def maybe_initialize(mode: str = "auto") -> None:
    """mode: auto | on | off. With JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID set, initialises explicitly (local multi-process runs)."""
    if mode == "off" or (mode == "auto" and not cluster_detected()):
        return
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address and os.environ.get("JAX_NUM_PROCESSES"):
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()  # TPU pods and SLURM are auto-detected by JAX
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
