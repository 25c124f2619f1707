#!/usr/bin/env bash
# clue_jax on a Cloud TPU pod slice: copy this repository to every worker, set
# up a venv there, then run `python -m clue_jax.main` on all workers at once.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--skip-setup] [--dry-run] \
#       -- --config configs/llama3_pod.py --workdir /mnt/shared/runs/llama3 [--config.key=value ...]
#
# Steps (each a gcloud command; --dry-run prints them instead):
#   1. pack the working tree (no .git, runs/, caches) and scp it to every worker;
#   2. on every worker: unpack into REMOTE_DIR, make REMOTE_DIR/.venv, pip install
#      -e . with jax[tpu] (skipped with --skip-setup, e.g. for a rerun);
#   3. on every worker, in parallel: python -m clue_jax.main --distributed=on ARGS.
#      jax.distributed.initialize() finds the other workers by itself on a TPU VM.
# Paths in ARGS (workdir, checkpoints, data) are read on every worker: use a
# filesystem they all mount (Filestore/NFS, or a gcsfuse bucket mount). Rerunning
# the same command resumes from the workdir.
# Environment: REMOTE_DIR (default: clue_jax, relative to the remote home),
# JAX_TPU_SPEC (default: jax[tpu], e.g. "jax[tpu]==0.10.2" to pin).
set -euo pipefail

usage() {
  echo "usage: $0 --tpu NAME --zone ZONE [--project P] [--skip-setup] [--dry-run] -- ARGS for clue_jax.main" >&2
  exit 2
}

TPU="" ZONE="" PROJECT="" SKIP_SETUP=0 DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU=${2:?}; shift 2 ;;
    --zone) ZONE=${2:?}; shift 2 ;;
    --project) PROJECT=${2:?}; shift 2 ;;
    --skip-setup) SKIP_SETUP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done
ARGS=("$@")
[[ -n "$TPU" && -n "$ZONE" && ${#ARGS[@]} -gt 0 ]] || usage

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR=${REMOTE_DIR:-clue_jax}
JAX_TPU_SPEC=${JAX_TPU_SPEC:-jax[tpu]}
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

if [[ $SKIP_SETUP -eq 0 ]]; then
  run tar -C "$ROOT" -czf "$TARBALL" --exclude=./.git --exclude=./runs --exclude=./.venv \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache .
  run "${GCLOUD[@]}" scp "$TARBALL" "$TPU:clue_jax_code.tar.gz" --worker=all "${WHERE[@]}"
  SETUP="mkdir -p $(quote "$REMOTE_DIR") && tar -xzf clue_jax_code.tar.gz -C $(quote "$REMOTE_DIR") && cd $(quote "$REMOTE_DIR") && \
python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . $(quote "$JAX_TPU_SPEC")"
  run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" --command="$SETUP"
fi

RUN="cd $(quote "$REMOTE_DIR") && TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m clue_jax.main --distributed=on $(quote "${ARGS[@]}")"
run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" --command="$RUN"
