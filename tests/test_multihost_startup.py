"""The multi-host start-up race: 10 fresh 2-process starts in a row all succeed.

Before, each process decided on its own whether a stage was done: a process that
started late saw the done.json the other had just written, skipped the stage and
its barrier, and the run died with `sync_global_devices name mismatch`. Process 1
here starts its stages 0-0.9 s late (process 0 in the last starts), so both orders
and the in-between are met.
"""
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "workers", "stages_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair(workdir, delays):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
               JAX_NUM_PROCESSES="2", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, WORKER, str(workdir), str(delay)], env=dict(env, JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, delay in enumerate(delays)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=90)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


@pytest.mark.slow
def test_ten_fresh_two_process_starts_in_a_row_all_succeed(tmp_path):
    for i in range(10):
        delays = (0.0, 0.1 * i) if i < 8 else (0.5 * (i - 7), 0.0)
        outs = _start_pair(tmp_path / f"run{i}", delays)
        for rank, (code, out, err) in enumerate(outs):
            assert code == 0, f"start {i}, process {rank}:\n{err[-3000:]}"
            assert "ran=['world', 'tokenizer', 'pretrain'] reused=[]" in out, (i, rank, out)
    # A rerun of the last workdir reuses every stage, in both processes.
    for code, out, err in _start_pair(tmp_path / "run9", (0.3, 0.0)):
        assert code == 0, err[-3000:]
        assert "ran=[] reused=['world', 'tokenizer', 'pretrain']" in out
