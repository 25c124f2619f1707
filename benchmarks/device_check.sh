#!/usr/bin/env bash
# Device check: the accelerator path measured on one GPU in at most 8 minutes.
#
#   bash benchmarks/device_check.sh                 # on the GPU machine, from a copy of the repository
#   bash benchmarks/device_check.sh --dry-run       # print the commands, run nothing
#   bash benchmarks/device_check.sh --smoke         # every part at toy size on the CPU (DEVICE_CHECK_SMOKE=1)
#   bash benchmarks/device_check.sh --fetch-wheels  # HERE, where a registry is reachable: .whl/ for the GPU machine
#
# Parts, each under its own time limit (a slow one cannot eat the others' time) and all under one deadline:
#   env               JAX's backend and devices, versions, missing modules (stops here without a GPU)
#   tests             the tests of the accelerator path, on the GPU, float32 matmuls at full precision
#   train_throughput  benchmarks/device_throughput.py: tokens/s and MFU against a bf16 matmul peak measured in the run
#   attention         benchmarks/attention_backends.py: the planned (cuDNN) attention against XLA's, bf16
#   scoring           benchmarks/scoring.py --skip-blocks: scoring's visible key blocks vs all, T = 2048, 8192
#   teacher_scoring   benchmarks/teacher_scoring.py: cached and live teacher scoring, 70B heads, T = 2048, 8192
# Every part writes JSON under benchmarks/results/device/ (smoke: $TMPDIR/device_check_smoke), rewritten after
# each case of the part; summary.json comes last, and all of it (plus device_check.log) is copied to $OUT when
# that is set. The exit code is 1 when any part failed, timed out or was skipped, 3 when JAX sees no GPU, 4
# when a module is missing.
#
# Environment: no registry is reachable from the GPU machine, so nothing is installed from one. Its image's
# python3 has jax with the CUDA plugin, flax, optax, orbax, numpy, transformers; the project runs from this
# checkout (PYTHONPATH), and what the image lacks (ml_collections, pytest and its plugins) comes as wheels in
# .whl/ (`--fetch-wheels` fetches them all; carry .whl), installed with pip --no-index into a private folder.
# No part needs tensorboardX: only Trainer.run writes TensorBoard files, and without tensorboardX the one
# test that calls it is left out. DEVICE_CHECK_PYTHON, DEVICE_CHECK_RESULTS, DEVICE_CHECK_WHEELS,
# DEVICE_CHECK_BUDGET_S and DEVICE_CHECK_TESTS override the python, the results folder, the wheel folder,
# the overall deadline (seconds) and the pytest arguments.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

SMOKE=${DEVICE_CHECK_SMOKE:-0}
DRY=0
FETCH=0
for arg in "$@"; do
  case $arg in
    --smoke) SMOKE=1 ;;
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$arg' to benchmarks/device_check.sh (--smoke, --dry-run, --fetch-wheels)" >&2
       exit 2 ;;
  esac
done

if [[ -n ${DEVICE_CHECK_PYTHON:-} ]]; then PY=$DEVICE_CHECK_PYTHON
elif [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi
WHEELS=${DEVICE_CHECK_WHEELS:-$ROOT/.whl}
# Pure-Python packages the GPU image lacks, at the versions the dev environment pins: ml_collections (the
# configs), pytest and what it needs beyond the image (the tests part), pytest-xdist (its 4 workers).
WHEEL_PKGS=${DEVICE_CHECK_WHEEL_PKGS:-ml-collections==1.1.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
  pytest-xdist==3.8.0 execnet==2.1.2}

if (( FETCH )); then
  cmd=("$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d "$WHEELS" $WHEEL_PKGS)
  echo "+ ${cmd[*]}"
  (( DRY )) || "${cmd[@]}" || exit 1
  echo "then: run this script on the GPU machine with carry [\".whl\"]"
  exit 0
fi

if (( SMOKE )); then
  RESULTS=${DEVICE_CHECK_RESULTS:-${TMPDIR:-/tmp}/device_check_smoke}
  export JAX_PLATFORMS=cpu
  SMOKE_FLAG=--smoke
  DEFAULT_TESTS="tests/test_attention_backend.py::test_plan_cpu_is_the_dense_xla_path"
else
  RESULTS=${DEVICE_CHECK_RESULTS:-$ROOT/benchmarks/results/device}
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda,cpu}  # the GPU first; a CPU beside it for code that asks for one
  SMOKE_FLAG=
  # The accelerator path: fused attention, remat, scoring, the KV cache, the models (51 tests; 7 min on the
  # loaded 2-core CPU, mostly compiling, hence 4 workers sharing the GPU, none preallocating). The 4 tests that
  # build meshes of 4 or 8 fake CPU devices cannot run on one GPU (found with one CPU device; CI runs them).
  DEFAULT_TESTS="tests/test_attention_backend.py tests/test_remat.py tests/test_scoring.py tests/test_kv_cache.py
    tests/test_models.py
    --deselect tests/test_attention_backend.py::test_plan_tpu_is_splash_with_softcap_and_mesh_axes
    --deselect tests/test_attention_backend.py::test_splash_under_shard_map_matches_reference
    --deselect tests/test_scoring.py::test_scorer_sharded_bf16_and_corpus
    --deselect tests/test_models.py::test_state_shardings_follow_rules_and_skip_indivisible_dims"
  if (( DRY )) || "$PY" -c "import xdist" 2> /dev/null; then DEFAULT_TESTS+=" -n 4"; fi
fi
read -r -a TESTS <<< "$(tr '\n' ' ' <<< "${DEVICE_CHECK_TESTS:-$DEFAULT_TESTS}")"
BUDGET=${DEVICE_CHECK_BUDGET_S:-470}  # 8 minutes, less the set-up and the summary
DEADLINE=$(( $(date +%s) + BUDGET ))
LOG=$RESULTS/device_check.log
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

say() { if (( DRY )); then echo "$*"; else echo "$*" | tee -a "$LOG"; fi; }

# run_part NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, time to the deadline), logs its output,
# and appends "NAME rc seconds limit" to parts.tsv (rc "skipped" when under 10 s were left).
run_part() {
  local name=$1 limit=$2 left rc start us
  shift 2
  left=$(( DEADLINE - $(date +%s) - 5 ))
  (( limit > left )) && limit=$left
  if (( DRY )); then echo "+ [$name, limit ${limit}s] $*"; return 0; fi
  if (( limit < 10 )); then
    say "== $name: skipped, ${left}s left before the deadline"
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$RESULTS/parts.tsv"
    return 0
  fi
  say "== $name (limit ${limit}s): $*"
  start=${EPOCHREALTIME/./}  # microseconds
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  us=$(( ${EPOCHREALTIME/./} - start ))
  printf '%s\t%s\t%d.%03d\t%s\n' "$name" "$rc" $(( us / 1000000 )) $(( us / 1000 % 1000 )) "$limit" \
    >> "$RESULTS/parts.tsv"
  say "== $name: exit $rc"
  return "$rc"
}

if (( ! DRY )); then
  mkdir -p "$RESULTS" || exit 2
  # nothing of an earlier run may pass for this one's
  rm -f "$RESULTS"/{parts.tsv,tests.xml,env.json,tests.json,train_throughput.json,attention.json} \
    "$RESULTS"/{scoring_blocks.json,teacher_scoring.json,summary.json} "$LOG"
fi
say "device check: python $PY, results $RESULTS, JAX_PLATFORMS=$JAX_PLATFORMS, smoke $SMOKE, budget ${BUDGET}s"

PYTHONPATH_EXTRA=
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  SITE=${TMPDIR:-/tmp}/device_check_site
  cmd=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE"
       "$WHEELS"/*.whl)
  say "+ ${cmd[*]}"
  if (( ! DRY )); then "${cmd[@]}" 2>&1 | tee -a "$LOG"; fi
  PYTHONPATH_EXTRA=:$SITE
fi
export PYTHONPATH=$ROOT$PYTHONPATH_EXTRA${PYTHONPATH:+:$PYTHONPATH}

summary() {
  local cmd=("$PY" benchmarks/device_check.py summary --results-dir "$RESULTS")
  [[ -n ${OUT:-} ]] && cmd+=(--copy-to "$OUT")
  if (( DRY )); then echo "+ [summary] ${cmd[*]}"; return 0; fi
  "${cmd[@]}" > /dev/null  # one line per part on stderr (and in the log); the JSON is in summary.json
}

run_part env 60 "$PY" benchmarks/device_check.py env --results-dir "$RESULTS" $SMOKE_FLAG
env_rc=$?
if (( env_rc )); then
  say "device check stopped: the environment cannot run the parts (see $RESULTS/env.json)"
  summary
  exit "$env_rc"
fi
# Trainer.run writes TensorBoard files where tensorboardX is installed (the GPU image has none): without it,
# the one test that calls Trainer.run is left out (named in the log), never the whole part.
if (( ! DRY && ! SMOKE )) && [[ -z ${DEVICE_CHECK_TESTS:-} ]] && ! "$PY" -c "import tensorboardX" 2> /dev/null; then
  TESTS+=(--deselect tests/test_remat.py::test_trainer_runs_with_remat)
  say "tensorboardX missing: tests/test_remat.py::test_trainer_runs_with_remat left out"
fi
run_part tests 150 env JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false \
  "$PY" -m pytest -q -p no:cacheprovider --junitxml="$RESULTS/tests.xml" "${TESTS[@]}"
run_part train_throughput 80 "$PY" benchmarks/device_throughput.py --results-dir "$RESULTS" $SMOKE_FLAG
run_part attention 70 "$PY" benchmarks/attention_backends.py --results-dir "$RESULTS" $SMOKE_FLAG
run_part scoring 50 "$PY" benchmarks/scoring.py --skip-blocks --out "$RESULTS/scoring_blocks.json" $SMOKE_FLAG
run_part teacher_scoring 70 "$PY" benchmarks/teacher_scoring.py --results-dir "$RESULTS" $SMOKE_FLAG
summary
rc=$?
(( DRY )) || say "device check: $( (( rc )) && echo 'NOT all parts ok' || echo 'all parts ok'); $RESULTS/summary.json"
exit "$rc"
