"""The TPU pod and SLURM launchers: their dry runs print the exact commands (Python setup, detach, logs,
flags), and the pod launcher's remote commands really start, follow and stop a run (a fake `gcloud` runs
them in a local "worker" home, with a fake `uv` and a fake python standing in for clue_jax.main).
"""
import os
import shlex
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")
POD = ["--tpu", "clue-pod", "--zone", "us-central2-b"]
RUN_ARGS = ["--config", "configs/llama3_pod.py", "--workdir", "/mnt/shared/runs/my run"]
SSH = "gcloud compute tpus tpu-vm ssh clue-pod --worker=all --zone=us-central2-b "


def _bash(script, *args, env=None, timeout=60):
    env = {k: v for k, v in dict(os.environ, **(env or {})).items() if v is not None}
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _remote(line):
    """The --command=... of one printed `gcloud ... ssh` line, unquoted."""
    words = shlex.split(line)
    return next(w[len("--command="):] for w in words if w.startswith("--command="))


# ----------------------------------------------------------------------------- TPU pod: dry runs
def test_tpu_dry_run_prints_copy_python_setup_and_detached_start(tmp_path):
    proc = _bash(TPU_POD, *POD, "--dry-run", "--", *RUN_ARGS, env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4, proc.stdout
    assert lines[0].startswith(f"tar -C {ROOT} -czf {tmp_path}/clue_jax_code.tar.gz --exclude=./.git")
    assert lines[1] == (f"gcloud compute tpus tpu-vm scp {tmp_path}/clue_jax_code.tar.gz "
                        "clue-pod:clue_jax_code.tar.gz --worker=all --zone=us-central2-b")
    assert lines[2].startswith(SSH) and lines[3].startswith(SSH)
    setup, start = _remote(lines[2]), _remote(lines[3])
    assert setup == (
        "mkdir -p clue_jax && tar -xzf clue_jax_code.tar.gz -C clue_jax && cd clue_jax && "
        "{ command -v uv >/dev/null || [ -x $HOME/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; } && "
        "export PATH=$HOME/.local/bin:$PATH && uv venv --allow-existing --python 3.11 .venv && "
        "uv pip install --python .venv/bin/python -e . 'jax[tpu]'")
    assert start == (
        "cd clue_jax && mkdir -p logs && if PID=$(cat logs/clue_jax_$(hostname).pid 2>/dev/null); "
        "[ -n \"$PID\" ] && grep -qs clue_jax.main /proc/$PID/cmdline; then echo \"$(hostname): a run is still going "
        "(pid $PID); stop it with --stop\" >&2; exit 1; fi && "
        "{ TF_CPP_MIN_LOG_LEVEL=3 setsid nohup .venv/bin/python -m clue_jax.main --distributed=on "
        "--config configs/llama3_pod.py --workdir '/mnt/shared/runs/my run' "
        "> logs/clue_jax_$(hostname).log 2>&1 < /dev/null & echo $! > logs/clue_jax_$(hostname).pid; } && "
        "echo \"$(hostname): started pid $(cat logs/clue_jax_$(hostname).pid), log clue_jax/logs/clue_jax_$(hostname).log\"")
    for command in (setup, start):
        assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0  # valid shell on the worker


def test_tpu_dry_run_settings_and_skip_setup():
    env = {"REMOTE_DIR": "work dir", "JAX_TPU_SPEC": "jax[tpu]==0.10.2", "PYTHON_VERSION": "3.12"}
    proc = _bash(TPU_POD, *POD, "--project", "p1", "--dry-run", "--", *RUN_ARGS, env=env)
    setup = _remote(proc.stdout.splitlines()[2])
    assert "--zone=us-central2-b --project=p1" in proc.stdout.splitlines()[2]
    assert setup.startswith("mkdir -p 'work dir' && tar -xzf clue_jax_code.tar.gz -C 'work dir' && cd 'work dir'")
    assert "uv venv --allow-existing --python 3.12 .venv" in setup and setup.endswith("-e . 'jax[tpu]==0.10.2'")
    skip = _bash(TPU_POD, *POD, "--skip-setup", "--dry-run", "--", *RUN_ARGS)
    assert skip.returncode == 0 and len(skip.stdout.splitlines()) == 1 and "setsid nohup" in skip.stdout


def test_tpu_dry_run_logs_and_stop():
    logs = _bash(TPU_POD, *POD, "--dry-run", "--logs", env={"LOG_LINES": "7"})
    assert logs.returncode == 0 and logs.stdout.startswith(SSH)
    assert _remote(logs.stdout) == 'cd clue_jax && tail -n 7 -F logs/clue_jax_$(hostname).log | sed -u "s/^/$(hostname): /"'
    stop = _bash(TPU_POD, *POD, "--dry-run", "--stop")
    assert _remote(stop.stdout) == (
        "cd clue_jax && if PID=$(cat logs/clue_jax_$(hostname).pid 2>/dev/null); [ -n \"$PID\" ] && "
        "grep -qs clue_jax.main /proc/$PID/cmdline; then kill -TERM $PID && echo \"$(hostname): sent SIGTERM to $PID\"; "
        "else echo \"$(hostname): no run\"; fi")


@pytest.mark.parametrize("args", [[], ["--tpu", "x"], POD, [*POD, "--bogus"], [*POD, "--logs", "--", "x"], ["--tpu"]])
def test_tpu_bad_usage_is_refused(args):
    proc = _bash(TPU_POD, *args)
    assert proc.returncode == 2 and "usage" in proc.stderr + proc.stdout


# ----------------------------------------------------------------------------- TPU pod: a fake worker
FAKE_GCLOUD = """#!/usr/bin/env bash
# gcloud compute tpus tpu-vm {scp SRC NAME:DEST | ssh NAME --command=CMD} ... on one local "worker" ($WORKER_HOME)
set -euo pipefail
echo "gcloud $*" >> "$WORKER_HOME/../gcloud.calls"
shift 3
case "$1" in
  scp) cp "$2" "$WORKER_HOME/${3#*:}" ;;
  ssh) for a in "$@"; do [[ "$a" == --command=* ]] && cmd=${a#--command=}; done
       cd "$WORKER_HOME" && HOME="$WORKER_HOME" exec bash -c "$cmd" ;;
esac
"""
FAKE_UV = """#!/usr/bin/env bash
# uv venv ... DIR: a venv whose python stands in for clue_jax.main; uv pip install ...: recorded
echo "uv $*" >> "$HOME/uv.calls"
if [[ "$1" == venv ]]; then
  dir=${@: -1}; mkdir -p "$dir/bin"
  printf '%s\\n' '#!/usr/bin/env bash' 'echo "fake clue_jax: $*"' \\
    'trap "echo got SIGTERM, checkpoint saved; exit 0" TERM' 'while true; do sleep 0.05; done' > "$dir/bin/python"
  chmod +x "$dir/bin/python"
fi
"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_tpu_launcher_sets_up_starts_detached_follows_and_stops(tmp_path):
    bin_dir, home = tmp_path / "bin", tmp_path / "worker"
    bin_dir.mkdir()
    home.mkdir()
    _executable(bin_dir / "gcloud", FAKE_GCLOUD)
    _executable(bin_dir / "uv", FAKE_UV)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "WORKER_HOME": str(home), "TMPDIR": str(tmp_path)}
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    log = home / "clue_jax" / "logs" / f"clue_jax_{host}.log"
    pid_file = log.with_suffix(".pid")

    start = _bash(TPU_POD, *POD, "--", *RUN_ARGS, env=env)  # returns while the run goes on
    assert start.returncode == 0, start.stderr
    assert (home / "clue_jax" / "pyproject.toml").exists() and (home / "clue_jax" / "clue_jax" / "main.py").exists()
    assert (home / "uv.calls").read_text().splitlines() == [
        "uv venv --allow-existing --python 3.11 .venv", "uv pip install --python .venv/bin/python -e . jax[tpu]"]
    assert f"{host}: started pid" in start.stdout and "--logs" in start.stderr and "--stop" in start.stderr
    pid = int(pid_file.read_text())
    try:
        for _ in range(100):
            if log.exists() and "fake clue_jax" in log.read_text():
                break
            time.sleep(0.05)
        assert log.read_text().splitlines()[0] == (
            "fake clue_jax: -m clue_jax.main --distributed=on --config configs/llama3_pod.py "
            "--workdir /mnt/shared/runs/my run")
        os.kill(pid, 0)  # alive after the "ssh session" ended

        again = _bash(TPU_POD, *POD, "--skip-setup", "--", *RUN_ARGS, env=env)
        assert again.returncode != 0 and f"a run is still going (pid {pid})" in again.stderr
        assert int(pid_file.read_text()) == pid

        logs = _bash(TPU_POD, *POD, "--logs", env=dict(env, FOLLOW="0"))
        assert logs.returncode == 0 and logs.stdout.startswith(f"{host}: fake clue_jax: -m clue_jax.main")

        stop = _bash(TPU_POD, *POD, "--stop", env=env)
        assert stop.stdout.strip() == f"{host}: sent SIGTERM to {pid}"
        for _ in range(100):
            if "got SIGTERM" in log.read_text():
                break
            time.sleep(0.05)
        assert "got SIGTERM, checkpoint saved" in log.read_text()
    finally:
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
    time.sleep(0.2)
    assert _bash(TPU_POD, *POD, "--stop", env=env).stdout.strip() == f"{host}: no run"


# ----------------------------------------------------------------------------- SLURM
def _slurm_dry_run(tmp_path, *args, **env):
    env = {"CLUE_JAX_ROOT": "/shared/clue_jax", "SLURM_JOB_ID": None, "SLURM_NTASKS_PER_NODE": None,
           "XLA_FLAGS": None, "NCCL_DEBUG": None, "XLA_PYTHON_CLIENT_MEM_FRACTION": None, **env}
    proc = _bash(SLURM, *args, "--config", "configs/gpt2_gpu.py", "--workdir", "/shared/runs/gpt 2", env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_highest_priority_async_stream=true "
             "--xla_gpu_enable_pipelined_all_gather=true --xla_gpu_enable_pipelined_reduce_scatter=true "
             "--xla_gpu_enable_pipelined_all_reduce=true --xla_gpu_enable_while_loop_double_buffering=true "
             "--xla_gpu_all_reduce_combine_threshold_bytes=536870912 "
             "--xla_gpu_all_gather_combine_threshold_bytes=134217728 "
             "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864")


def test_slurm_dry_run_sets_up_python_then_prints_env_and_srun(tmp_path):
    venv = tmp_path / "venv"
    lines = _slurm_dry_run(tmp_path, "--dry-run", VENV=str(venv))
    assert lines == [
        "bash -c 'command -v uv >/dev/null || [ -x \"$HOME/.local/bin/uv\" ] || curl -LsSf https://astral.sh/uv/install.sh | sh'",
        "export PATH=$HOME/.local/bin:$PATH",
        f"uv venv --allow-existing --python 3.11 {venv}",
        f"uv pip install --python {venv}/bin/python -e /shared/clue_jax 'jax[cuda12]'",
        "mkdir -p /shared/clue_jax/logs",
        f"export 'XLA_FLAGS={GPU_FLAGS}' NCCL_DEBUG=WARN XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 TF_CPP_MIN_LOG_LEVEL=3",
        f"srun --kill-on-bad-exit=1 --ntasks-per-node=8 --chdir=/shared/clue_jax "
        f"--output=/shared/clue_jax/logs/clue_jax_%j_%t.log {venv}/bin/python -m clue_jax.main --distributed=on "
        "--config configs/gpt2_gpu.py --workdir '/shared/runs/gpt 2'",
    ]


def test_slurm_dry_run_with_a_venv_skips_setup_and_keeps_the_users_settings(tmp_path):
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    _executable(tmp_path / "venv" / "bin" / "python", "#!/bin/sh\n")
    lines = _slurm_dry_run(tmp_path, VENV=str(tmp_path / "venv"), DRY_RUN="1", XLA_FLAGS="--xla_dump_to=/tmp/x",
                           NCCL_DEBUG="INFO", SLURM_NTASKS_PER_NODE="4", LOG_DIR=str(tmp_path / "logs"))
    assert len(lines) == 3 and lines[0] == f"mkdir -p {tmp_path}/logs"
    assert lines[1] == f"export 'XLA_FLAGS={GPU_FLAGS} --xla_dump_to=/tmp/x' NCCL_DEBUG=INFO " \
                       "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 TF_CPP_MIN_LOG_LEVEL=3"
    assert f"--ntasks-per-node=4 --chdir=/shared/clue_jax --output={tmp_path}/logs/clue_jax_%j_%t.log" in lines[2]


def test_slurm_xla_flags_are_known_to_xla(tmp_path):
    """XLA aborts on an unknown flag; these parse in the installed jaxlib (GPU flags are defined in every build)."""
    env = dict(os.environ, XLA_FLAGS=GPU_FLAGS, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(jnp.ones(2).sum())"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "2.0", proc.stderr[-2000:]


def test_slurm_refuses_bad_usage():
    assert _bash(SLURM).returncode == 2
    outside = _bash(SLURM, "--config", "c.py", env={"SLURM_JOB_ID": None})
    assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr
