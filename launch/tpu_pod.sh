#!/usr/bin/env bash
# clue_jax on a Cloud TPU pod slice: copy this repository to every worker, set up Python >= 3.11 there,
# start `python -m clue_jax.main` detached on all workers at once, then follow or stop it.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--skip-setup] [--dry-run] \
#       -- --config configs/llama3_pod.py --workdir /mnt/shared/runs/llama3 [--config.key=value ...]
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--dry-run] --logs   # follow every worker's log
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--dry-run] --stop   # SIGTERM: checkpoint, then stop
#
# Steps of a start (each a gcloud command; --dry-run prints them instead):
#   1. pack the working tree (no .git, runs/, caches) and scp it to every worker;
#   2. on every worker: unpack into REMOTE_DIR; install uv if missing; `uv venv --python 3.11` (the TPU VM
#      images ship Python 3.10, jax/flax/orbax need >= 3.11; uv downloads its own Python); `uv pip install
#      -e . jax[tpu]` (steps 1-2 are skipped with --skip-setup, e.g. for a rerun);
#   3. on every worker: nohup python -m clue_jax.main --distributed=on ARGS, detached from the ssh session
#      (a dropped connection does not stop it), output in REMOTE_DIR/logs/clue_jax_<worker hostname>.log,
#      pid in REMOTE_DIR/logs/clue_jax_<worker hostname>.pid. A worker with a live run refuses a second one.
#      jax.distributed.initialize() finds the other workers by itself on a TPU VM.
# Paths in ARGS (workdir, checkpoints, data) are read on every worker: use a filesystem they all mount
# (Filestore/NFS, or a gcsfuse bucket mount). Rerunning the same command resumes from the workdir.
# Environment: REMOTE_DIR (default: clue_jax, relative to the remote home), JAX_TPU_SPEC (default:
# jax[tpu], e.g. "jax[tpu]==0.10.2" to pin), PYTHON_VERSION (default: 3.11), LOG_LINES (default: 50,
# lines --logs shows first), FOLLOW (default: 1; 0 = --logs prints the last lines and returns).
set -euo pipefail

usage() {
  echo "usage: $0 --tpu NAME --zone ZONE [--project P] [--skip-setup] [--dry-run] (-- ARGS for clue_jax.main | --logs | --stop)" >&2
  exit 2
}

TPU="" ZONE="" PROJECT="" SKIP_SETUP=0 DRY_RUN=0 ACTION=start
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) [[ $# -ge 2 ]] || usage; TPU=$2; shift 2 ;;
    --zone) [[ $# -ge 2 ]] || usage; ZONE=$2; shift 2 ;;
    --project) [[ $# -ge 2 ]] || usage; PROJECT=$2; shift 2 ;;
    --skip-setup) SKIP_SETUP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --logs) ACTION=logs; shift ;;
    --stop) ACTION=stop; shift ;;
    --) shift; break ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done
ARGS=("$@")
[[ -n "$TPU" && -n "$ZONE" ]] || usage
if [[ $ACTION == start ]]; then [[ ${#ARGS[@]} -gt 0 ]] || usage; else [[ ${#ARGS[@]} -eq 0 ]] || usage; fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR=${REMOTE_DIR:-clue_jax}
JAX_TPU_SPEC=${JAX_TPU_SPEC:-jax[tpu]}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
LOG_LINES=${LOG_LINES:-50}
[[ "$LOG_LINES" =~ ^[0-9]+$ ]] || { echo "LOG_LINES must be a number, got '$LOG_LINES'" >&2; exit 2; }
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
TARBALL="${TMPDIR:-/tmp}/clue_jax_code.tar.gz"

quote() {  # shell words, quoted only where needed (readable in --dry-run output)
  local out=() word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$word"); else out+=("${word@Q}"); fi
  done
  printf '%s' "${out[*]}"
}

run() {  # --dry-run: print the command on stdout; else echo it on stderr and run it
  if [[ $DRY_RUN -eq 1 ]]; then quote "$@"; echo; else echo "+ $(quote "$@")" >&2; "$@"; fi
}

on_all_workers() { run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" --command="$1"; }

# The remote shell expands $HOME, $PATH, $(hostname) and $PID on each worker (single quotes keep them here).
DIR=$(quote "$REMOTE_DIR")
LOG='logs/clue_jax_$(hostname).log'
PIDFILE='logs/clue_jax_$(hostname).pid'
# Sets PID and succeeds when this worker's recorded run is alive (and is clue_jax, not a reused pid).
ALIVE="PID=\$(cat $PIDFILE 2>/dev/null); [ -n \"\$PID\" ] && grep -qs clue_jax.main /proc/\$PID/cmdline"

case $ACTION in
  logs)
    TAIL="tail -n $LOG_LINES"; [[ ${FOLLOW:-1} == 0 ]] || TAIL+=" -F"
    on_all_workers "cd $DIR && $TAIL $LOG | sed -u \"s/^/\$(hostname): /\""
    exit 0 ;;
  stop)
    on_all_workers "cd $DIR && if $ALIVE; then kill -TERM \$PID && echo \"\$(hostname): sent SIGTERM to \$PID\"; \
else echo \"\$(hostname): no run\"; fi"
    exit 0 ;;
esac

if [[ $SKIP_SETUP -eq 0 ]]; then
  run tar -C "$ROOT" -czf "$TARBALL" --exclude=./.git --exclude=./runs --exclude=./.venv \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache .
  run "${GCLOUD[@]}" scp "$TARBALL" "$TPU:clue_jax_code.tar.gz" --worker=all "${WHERE[@]}"
  on_all_workers "mkdir -p $DIR && tar -xzf clue_jax_code.tar.gz -C $DIR && cd $DIR && \
{ command -v uv >/dev/null || [ -x \$HOME/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; } && \
export PATH=\$HOME/.local/bin:\$PATH && uv venv --allow-existing --python $(quote "$PYTHON_VERSION") .venv && \
uv pip install --python .venv/bin/python -e . $(quote "$JAX_TPU_SPEC")"
fi

on_all_workers "cd $DIR && mkdir -p logs && \
if $ALIVE; then echo \"\$(hostname): a run is still going (pid \$PID); stop it with --stop\" >&2; exit 1; fi && \
{ TF_CPP_MIN_LOG_LEVEL=3 setsid nohup .venv/bin/python -m clue_jax.main --distributed=on $(quote "${ARGS[@]}") \
> $LOG 2>&1 < /dev/null & echo \$! > $PIDFILE; } && echo \"\$(hostname): started pid \$(cat $PIDFILE), log $DIR/$LOG\""
if [[ $DRY_RUN -eq 0 ]]; then
  where="--tpu $(quote "$TPU") --zone $(quote "$ZONE")${PROJECT:+ --project $(quote "$PROJECT")}"
  echo "clue_jax runs detached on every worker. Follow: $0 $where --logs   Stop: $0 $where --stop" >&2
fi
