#!/usr/bin/env bash
# GPU check for ln_ext, on a machine with one NVIDIA GPU (no network needed): build for that
# GPU, the CUDA tests, compute-sanitizer memcheck on small cases covering every kernel regime,
# the two ways cluster blocks meet timed side by side, the quick benchmarks, racecheck and
# initcheck, then the rest of the test suite: in that order, the most useful first.
#
#   GPU_CHECK_OUT=/some/dir bash scripts/gpu_check.sh        (`make gpu-check`)
#
# Fits in 6 minutes on a 16-core H200 machine, the build included (one arch, MAX_JOBS=16):
# every step runs under `timeout`, bounded by what is left of GPU_CHECK_BUDGET_S (default
# 330 s; a timed-out step gets 15 s more), and a failing step never stops the others.
# Results, at most 8 files in one flat folder ($GPU_CHECK_OUT, else $OUT, else ./gpu_out),
# each written as soon as its step ends, so that a later step's failure or the end of the
# machine's time leaves every finished step's results:
#   summary.txt      machine, versions; per step, as it ends: status, seconds and its key
#                    lines (test counts and failures, sanitizer summaries, the kernel each
#                    shape launched, benchmark tables)
#   build.log        the build and the import check
#   pytest.log       pytest -v: CUDA tests first, the rest last
#   sanitizer.log    compute-sanitizer output of each tool over scripts/sanitizer_cases.py
#   cluster_sum.json scripts/cluster_sum_timing.py: LN_EXT_CLUSTER_SUM=barrier vs lean
#   layer_norm.json layer_norm.md rnn.json     from benchmarks/ --quick
# Environment: GPU_CHECK_BUDGET_S, GPU_CHECK_SKIP (step names, e.g. "initcheck pytest_rest"),
# GPU_CHECK_BENCH_ARGS (more bench_layer_norm.py arguments, e.g. "--dtypes bf16,fp32" or
# "--providers ln_ext,torch,compile"), PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default:
# the visible GPU's), MAX_JOBS (default 16).
# Exit status: 0 when every step that ran passed, 1 otherwise.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-330}
SKIP=" ${GPU_CHECK_SKIP:-} "
PY=${PYTHON:-python3}
OUT_DIR=${GPU_CHECK_OUT:-${OUT:-$ROOT/gpu_out}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1

SUMMARY=$OUT_DIR/summary.txt
BUILD_LOG=$OUT_DIR/build.log
PYTEST_LOG=$OUT_DIR/pytest.log
SAN_LOG=$OUT_DIR/sanitizer.log
BENCH_LOG=$WORK/bench.log
: > "$SUMMARY"; : > "$BUILD_LOG"; : > "$PYTEST_LOG"; : > "$SAN_LOG"; : > "$BENCH_LOG"
FAILED=0

say() { echo "$*" | tee -a "$SUMMARY"; }
# step_line NAME STATUS SECONDS: the step's outcome, in the summary at once.
step_line() { printf '%-18s %-26s %5s\n' "$1" "$2" "$3" | tee -a "$SUMMARY"; }

# run_step NAME MAX_SECONDS LOG COMMAND...
# Runs COMMAND (stdout and stderr appended to LOG) under a timeout of MAX_SECONDS or the time
# left in the budget, whichever is less, and records its outcome.
run_step() {
  local name=$1 max=$2 log=$3
  shift 3
  local left=$((START + BUDGET_S - $(date +%s)))
  if [[ $SKIP == *" $name "* ]]; then
    step_line "$name" "skipped (GPU_CHECK_SKIP)" 0
    return 0
  fi
  if ((left < 15)); then
    step_line "$name" "SKIPPED (budget spent)" 0
    FAILED=1
    return 0
  fi
  local limit=$((max < left ? max : left))
  echo "=== [$name] $(date -u +%H:%M:%S) timeout ${limit}s: $*" >>"$log"
  echo ">>> $name (limit ${limit}s)"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0))
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  # pytest exits 5 when no test was selected (e.g. no CUDA tests yet): not a failure.
  if [[ $rc == 5 && $name == pytest* ]]; then status="no tests selected"; rc=0; fi
  ((rc != 0)) && FAILED=1
  echo "=== [$name] exit $rc after ${took}s" >>"$log"
  step_line "$name" "$status" "$took"
  return 0
}

# ---------------------------------------------------------------- the machine and the tools
{
  echo "ln_ext GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  echo "output folder: $OUT_DIR, budget ${BUDGET_S}s, skip:${SKIP}"
  echo
  timeout 20 nvidia-smi 2>&1 || echo "nvidia-smi failed"
  timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory --format=csv 2>&1
} >>"$SUMMARY"

NVCC=$(command -v nvcc || true)
[[ -z $NVCC && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
if [[ -n $NVCC ]]; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
  export CUDA_HOME
  export PATH=$CUDA_HOME/bin:$PATH
fi
SANITIZER=$(command -v compute-sanitizer || true)
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
  [[ -z $SANITIZER && -x $candidate ]] && SANITIZER=$candidate
done
DETECTED_ARCH=$(timeout 60 "$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>>"$BUILD_LOG")
ARCH=${TORCH_CUDA_ARCH_LIST:-$DETECTED_ARCH}
XDIST=()
"$PY" -c "import xdist" >/dev/null 2>&1 && XDIST=(-n 4)
{
  echo
  echo "python: $("$PY" --version 2>&1) at $(command -v "$PY")"
  timeout 60 "$PY" -c "import torch, sys; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  timeout 30 "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || echo "triton: not importable"
  echo "nvcc: ${NVCC:-not found}  ($( [[ -n $NVCC ]] && "$NVCC" --version | tail -n 2 | head -n 1))"
  echo "CUDA_HOME: ${CUDA_HOME:-unset}   TORCH_CUDA_ARCH_LIST: ${ARCH:-unset}   compute-sanitizer: ${SANITIZER:-not found}"
  echo "pytest-xdist: ${XDIST[*]:-not installed}"
  echo
} >>"$SUMMARY" 2>&1

# digest PATTERN FILE [MAX]: the matching lines of a log, into the summary.
digest() { grep -E "$1" "$2" | head -n "${3:-40}" >>"$SUMMARY"; }

echo "================================================================ steps (as they end)" >>"$SUMMARY"
printf '%-18s %-26s %5s\n' step status seconds >>"$SUMMARY"

# ---------------------------------------------------------------- build
run_step build 150 "$BUILD_LOG" env MAX_JOBS="${MAX_JOBS:-16}" LN_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" \
  "$PY" setup.py build_ext --inplace
digest 'ln_ext build: CUDA kernels|Error|error:' "$BUILD_LOG" 20
run_step import 30 "$BUILD_LOG" "$PY" -c "
import ln_ext, torch
print('ln_ext', ln_ext.__file__, 'has_cuda_kernels =', ln_ext.has_cuda_kernels())
assert ln_ext.has_cuda_kernels(), 'this build has no CUDA kernels'
x = torch.randn(4, 1024, device='cuda', dtype=torch.bfloat16)
print('smoke: max |ln_ext - F.layer_norm| =', (ln_ext.layer_norm(x, (1024,)) - torch.nn.functional.layer_norm(x, (1024,))).abs().max().item())
"
digest '^(ln_ext |smoke:)|Error' "$BUILD_LOG" 10

# ---------------------------------------------------------------- correctness first
pytest_digest() {
  digest '^=+ .*(passed|failed|error|skipped|no tests ran|deselected).* =+$' "$PYTEST_LOG" 5
  digest '^(FAILED|ERROR) ' "$PYTEST_LOG" 40
}
run_step pytest_cuda 100 "$PYTEST_LOG" "$PY" -m pytest -m cuda -v -ra --durations=15 -p no:cacheprovider "${XDIST[@]}" tests
pytest_digest

sanitize() {  # sanitize TOOL SECONDS: one compute-sanitizer tool over the small cases
  if [[ -z $SANITIZER ]]; then
    echo "compute-sanitizer not found" >>"$SAN_LOG"
    step_line "$1" "FAILED (no sanitizer)" 0
    FAILED=1
    return
  fi
  # LN_EXT_LOG_LAUNCHES: which kernel each case took.
  run_step "$1" "$2" "$SAN_LOG" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 LN_EXT_LOG_LAUNCHES=1 \
    "$SANITIZER" --tool "$1" --error-exitcode 86 --print-limit 40 "$PY" scripts/sanitizer_cases.py
  digest '^=+ (ERROR|RACECHECK|INITCHECK|LEAK) SUMMARY|^sanitizer_cases|^FAIL ' "$SAN_LOG" 30
}
sanitize memcheck 50
{
  echo "== kernels launched by the sanitizer cases (LN_EXT_LOG_LAUNCHES):"
  grep -E '^ln_ext launch:' "$SAN_LOG" | sort -u | head -n 60
} >>"$SUMMARY"

# ---------------------------------------------------------------- what only a GPU can decide
run_step cluster_sum 45 "$BENCH_LOG" "$PY" scripts/cluster_sum_timing.py --out "$WORK/cluster"
[[ -f $WORK/cluster/cluster_sum.json ]] && cp "$WORK/cluster/cluster_sum.json" "$OUT_DIR/"
digest '^\||^ln_ext launch:' "$BENCH_LOG" 40

# shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of words
run_step bench_layer_norm 60 "$BENCH_LOG" env LN_EXT_LOG_LAUNCHES=1 "$PY" benchmarks/bench_layer_norm.py --quick \
  ${GPU_CHECK_BENCH_ARGS:-} --out "$WORK/bench"
for f in layer_norm.json layer_norm.md; do [[ -f $WORK/bench/$f ]] && cp "$WORK/bench/$f" "$OUT_DIR/$f"; done
{
  grep -E '^copy [0-9]|^not measured|^MISMATCH|^outputs that did not match|Traceback|Error' "$BENCH_LOG" | head -n 20
  [[ -f $WORK/bench/layer_norm.md ]] && cat "$WORK/bench/layer_norm.md"
  echo "== kernels launched by the benchmark shapes:"
  grep -E '^ln_ext launch:' "$BENCH_LOG" | sort -u | head -n 60
} >>"$SUMMARY"

sanitize racecheck 45
run_step bench_rnn 30 "$BENCH_LOG" "$PY" benchmarks/bench_rnn.py --quick --out "$WORK/bench"
[[ -f $WORK/bench/rnn.json ]] && cp "$WORK/bench/rnn.json" "$OUT_DIR/rnn.json"
[[ -f $WORK/bench/rnn.md ]] && cat "$WORK/bench/rnn.md" >>"$SUMMARY"

# ---------------------------------------------------------------- with what time is left
sanitize initcheck 30
# The CPU-only checks of the device code (tests/test_kernel_check.py) run in CI, not on GPU time.
run_step pytest_rest 200 "$PYTEST_LOG" "$PY" -m pytest -m "not cuda" -v -ra --durations=15 -p no:cacheprovider \
  --ignore=tests/test_kernel_check.py "${XDIST[@]}" tests
pytest_digest

TOTAL=$(($(date +%s) - START))
{
  echo
  echo "-- last lines of the benchmark output:"
  tail -n 15 "$BENCH_LOG"
  echo
  echo "total ${TOTAL}s; result: $([[ $FAILED == 0 ]] && echo PASS || echo FAIL)"
} >>"$SUMMARY" 2>&1
tail -n 3 "$SUMMARY"
echo "results in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit "$FAILED"
