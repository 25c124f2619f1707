#!/usr/bin/env bash
# N JAX processes on this machine, talking over loopback with gloo CPU collectives.
#
#   launch/local_multiprocess.sh N [--dry-run] [-- ARGS for python -m clue_jax.main]
#
# For tests and debugging the multi-host code paths (per-process input shares,
# process-0-only writes, orbax saving from several processes) without a
# cluster. Each process gets DEVICES_PER_PROCESS fake CPU devices (default 2),
# so N=2 gives a 4-device mesh spread over two processes, like two hosts.
#
# Without ARGS it runs the tiny quickstart in runs/local_mp. Environment:
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 2)
#   PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   PYTHON               interpreter (default: python)
#   LOG_DIR              where processes 1..N-1 write their logs (default: a new temp dir);
#                        process 0 writes to this terminal
# Exit status: 0 if every process succeeded, else the first failure's status
# (the other processes are then stopped, so none waits forever on a collective).
set -euo pipefail

usage() { echo "usage: $0 N [--dry-run] [-- ARGS for python -m clue_jax.main]" >&2; exit 2; }

[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || usage
NUM=$1; shift
DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done
ARGS=("$@")
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ${#ARGS[@]} -eq 0 ]]; then
  ARGS=(--config "$ROOT/configs/quickstart.py:tiny" --workdir "$ROOT/runs/local_mp")
fi
PYTHON=${PYTHON:-python}
DEVICES=${DEVICES_PER_PROCESS:-2}
[[ "$DEVICES" =~ ^[1-9][0-9]*$ ]] || { echo "DEVICES_PER_PROCESS must be a positive integer, got '$DEVICES'" >&2; exit 2; }
if [[ -z "${PORT:-}" ]]; then
  if [[ $DRY_RUN -eq 1 ]]; then
    PORT=PORT
  else  # ask the kernel for a free loopback port
    PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
fi
ADDRESS="127.0.0.1:$PORT"

env_for() {  # the environment of process $1, as NAME=VALUE words in the array ENV_WORDS
  ENV_WORDS=("JAX_COORDINATOR_ADDRESS=$ADDRESS" "JAX_NUM_PROCESSES=$NUM" "JAX_PROCESS_ID=$1"
             "JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}" "XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES"
             "PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}")
}

if [[ $DRY_RUN -eq 1 ]]; then
  for ((i = 0; i < NUM; i++)); do
    env_for "$i"
    printf '%q ' "${ENV_WORDS[@]}" "$PYTHON" -m clue_jax.main "${ARGS[@]}"
    printf '\n'
  done
  exit 0
fi

LOG_DIR=${LOG_DIR:-$(mktemp -d -t clue_jax_mp.XXXXXX)}
mkdir -p "$LOG_DIR"
PIDS=()
cleanup() {  # stop only the processes this script started
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

for ((i = 0; i < NUM; i++)); do
  env_for "$i"
  if [[ $i -eq 0 ]]; then
    env "${ENV_WORDS[@]}" "$PYTHON" -m clue_jax.main "${ARGS[@]}" &
  else
    env "${ENV_WORDS[@]}" "$PYTHON" -m clue_jax.main "${ARGS[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  fi
  PIDS+=($!)
done
if [[ $NUM -gt 1 ]]; then echo "local_multiprocess: $NUM processes on $ADDRESS; logs of processes 1..$((NUM - 1)) in $LOG_DIR" >&2; fi

status=0
REMAINING=("${PIDS[@]}")
while [[ ${#REMAINING[@]} -gt 0 ]]; do
  finished=""
  code=0
  wait -n -p finished "${REMAINING[@]}" || code=$?
  NEXT=()
  for pid in "${REMAINING[@]}"; do
    if [[ "$pid" != "$finished" ]]; then NEXT+=("$pid"); fi
  done
  REMAINING=("${NEXT[@]+"${NEXT[@]}"}")
  if [[ $code -ne 0 ]]; then
    status=$code
    for ((i = 0; i < NUM; i++)); do
      if [[ "${PIDS[$i]}" == "$finished" ]]; then
        echo "local_multiprocess: process $i exited with status $status; stopping the others" >&2
        if [[ $i -gt 0 ]]; then tail -n 30 "$LOG_DIR/process_$i.log" >&2; fi
      fi
    done
    break
  fi
done
if [[ $status -ne 0 ]]; then
  cleanup
  wait 2>/dev/null || true
fi
PIDS=()
exit "$status"
