"""One process of a 2-process run of a few Stages (gloo over loopback), for start-up race tests.

usage: stages_worker.py WORKDIR DELAY_S   (env: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)
Sleeps DELAY_S before looking at the stages, so the processes reach them in varied order;
prints "ran=[...] reused=[...]" at the end.
"""
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
from jax.experimental import multihost_utils

from clue_jax import distributed
from clue_jax.pipelines.stages import Stages


def stage(name, collective):
    """Process 0 writes a file; like the pipelines' world stage, or with a collective inside like training."""
    def fn(stage_dir):
        if jax.process_index() == 0:
            with open(os.path.join(stage_dir, "out.txt"), "w") as f:
                f.write(name)
        if collective:
            multihost_utils.sync_global_devices(f"{name}:inside")
        return {"file": os.path.join(stage_dir, "out.txt")}
    return fn


def main():
    workdir, delay = sys.argv[1], float(sys.argv[2])
    distributed.maybe_initialize("on")
    time.sleep(delay)
    stages = Stages(workdir)
    for name, collective in (("world", False), ("tokenizer", False), ("pretrain", True)):
        result = stages.run(name, {"name": name}, stage(name, collective))
        with open(result["file"]) as f:
            assert f.read() == name
    multihost_utils.sync_global_devices("end")
    print(f"ran={stages.ran} reused={stages.reused}", flush=True)


if __name__ == "__main__":
    main()
