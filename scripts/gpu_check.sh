#!/usr/bin/env bash
# GPU check for ln_ext, on a machine with one NVIDIA GPU (no network needed): build for that
# GPU, run the CUDA tests, compute-sanitizer (memcheck, racecheck, initcheck) on small cases
# covering every kernel regime, the quick benchmarks, then the rest of the test suite.
#
#   GPU_CHECK_OUT=/some/dir bash scripts/gpu_check.sh        (`make gpu-check`)
#
# Results, at most 8 files in one flat folder ($GPU_CHECK_OUT, else $OUT, else ./gpu_out):
#   summary.txt      machine, versions, every step's exit status and time, the key lines of
#                    each log, the LN-RNN table and the tail of the benchmark output
#   build.log        the build and the import check
#   pytest.log       pytest -v: CUDA tests first, then the rest
#   sanitizer.log    compute-sanitizer output of each tool over scripts/sanitizer_cases.py
#   layer_norm.json layer_norm.md layer_norm.png rnn.json     from benchmarks/ --quick
#
# Every step runs under `timeout`, bounded by what is left of GPU_CHECK_BUDGET_S (default
# 275 s; a timed-out step gets 15 s more to write what it has, so the whole check ends within
# 5 minutes); a failing step never stops the others.
# Environment: GPU_CHECK_BUDGET_S, GPU_CHECK_SKIP (step names, e.g. "initcheck pytest_rest"),
# GPU_CHECK_BENCH_ARGS (more bench_layer_norm.py arguments, e.g. "--dtypes bf16,fp32" or
# "--providers ln_ext,torch,compile"), PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default:
# the visible GPU's), MAX_JOBS (default 16).
# Exit status: 0 when every step that ran passed, 1 otherwise.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-275}
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
STEP_LINES=()
FAILED=0

say() { echo "$*" | tee -a "$SUMMARY"; }

# run_step NAME MAX_SECONDS LOG COMMAND...
# Runs COMMAND (stdout and stderr appended to LOG) under a timeout of MAX_SECONDS or the time
# left in the budget, whichever is less, and records its outcome.
run_step() {
  local name=$1 max=$2 log=$3
  shift 3
  local left=$((START + BUDGET_S - $(date +%s)))
  if [[ $SKIP == *" $name "* ]]; then
    STEP_LINES+=("$(printf '%-18s %-26s %5s' "$name" "skipped (GPU_CHECK_SKIP)" 0)")
    return 0
  fi
  if ((left < 15)); then
    STEP_LINES+=("$(printf '%-18s %-26s %5s' "$name" "SKIPPED (budget spent)" 0)")
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
  STEP_LINES+=("$(printf '%-18s %-26s %5s' "$name" "$status" "$took")")
  echo "<<< $name: $status (${took}s)"
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

# ---------------------------------------------------------------- build
run_step build 200 "$BUILD_LOG" env MAX_JOBS="${MAX_JOBS:-16}" LN_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" \
  "$PY" setup.py build_ext --inplace
run_step import 60 "$BUILD_LOG" "$PY" -c "
import ln_ext, torch
print('ln_ext', ln_ext.__file__, 'has_cuda_kernels =', ln_ext.has_cuda_kernels())
assert ln_ext.has_cuda_kernels(), 'this build has no CUDA kernels'
x = torch.randn(4, 1024, device='cuda', dtype=torch.bfloat16)
print('smoke: max |ln_ext - F.layer_norm| =', (ln_ext.layer_norm(x, (1024,)) - torch.nn.functional.layer_norm(x, (1024,))).abs().max().item())
"

# ---------------------------------------------------------------- tests and sanitizers
run_step pytest_cuda 90 "$PYTEST_LOG" "$PY" -m pytest -m cuda -v -ra --durations=15 -p no:cacheprovider "${XDIST[@]}" tests

sanitize() {  # sanitize TOOL: one compute-sanitizer tool over the small cases
  if [[ -z $SANITIZER ]]; then
    echo "compute-sanitizer not found" >>"$SAN_LOG"
    STEP_LINES+=("$(printf '%-18s %-26s %5s' "$1" "FAILED (no sanitizer)" 0)")
    FAILED=1
    return
  fi
  # LN_EXT_LOG_LAUNCHES: which kernel each case took (summary: "kernels launched").
  run_step "$1" "$2" "$SAN_LOG" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 LN_EXT_LOG_LAUNCHES=1 \
    "$SANITIZER" --tool "$1" --error-exitcode 86 --print-limit 40 "$PY" scripts/sanitizer_cases.py
}
sanitize memcheck 60
sanitize racecheck 60

# ---------------------------------------------------------------- benchmarks
# shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of words
run_step bench_layer_norm 90 "$BENCH_LOG" "$PY" benchmarks/bench_layer_norm.py --quick ${GPU_CHECK_BENCH_ARGS:-} \
  --out "$WORK/bench"
run_step bench_rnn 60 "$BENCH_LOG" "$PY" benchmarks/bench_rnn.py --quick --out "$WORK/bench"

# ---------------------------------------------------------------- with what time is left
sanitize initcheck 45
# The CPU-only checks of the device code (tests/test_kernel_check.py) run in CI, not on GPU time.
run_step pytest_rest 200 "$PYTEST_LOG" "$PY" -m pytest -m "not cuda" -v -ra --durations=15 -p no:cacheprovider \
  --ignore=tests/test_kernel_check.py "${XDIST[@]}" tests

# ---------------------------------------------------------------- collect and summarize
for f in layer_norm.json layer_norm.md layer_norm.png rnn.json; do
  [[ -f $WORK/bench/$f ]] && cp "$WORK/bench/$f" "$OUT_DIR/$f"
done
TOTAL=$(($(date +%s) - START))
{
  echo "================================================================ steps"
  printf '%-18s %-26s %5s\n' step status seconds
  printf '%s\n' "${STEP_LINES[@]}"
  echo
  echo "== build: $(grep -m1 'ln_ext build: CUDA kernels' "$BUILD_LOG" || echo 'no build line found')"
  grep -E '^(ln_ext |smoke:)|Error|error:' "$BUILD_LOG" | head -n 20
  echo "== pytest:"
  grep -E '^=+ .*(passed|failed|error|skipped|no tests ran|deselected).* =+$' "$PYTEST_LOG"
  grep -E '^(FAILED|ERROR) ' "$PYTEST_LOG" | head -n 40
  echo "== sanitizers:"
  grep -E '^=+ (ERROR|RACECHECK|INITCHECK|LEAK) SUMMARY|^sanitizer_cases|^=== \[' "$SAN_LOG" | grep -v ' timeout '
  grep -E '^FAIL ' "$SAN_LOG" | sort -u | head -n 30
  echo "== kernels launched by the sanitizer cases (LN_EXT_LOG_LAUNCHES):"
  grep -E '^ln_ext launch:' "$SAN_LOG" | sort -u | head -n 60
  echo "== benchmarks:"
  grep -E '^copy [0-9]|^not measured|^MISMATCH|^outputs that did not match|Traceback|Error' "$BENCH_LOG" | head -n 20
  [[ -f $WORK/bench/rnn.md ]] && cat "$WORK/bench/rnn.md"
  echo "-- last lines of the benchmark output:"
  tail -n 25 "$BENCH_LOG"
  echo
  echo "total ${TOTAL}s; result: $([[ $FAILED == 0 ]] && echo PASS || echo FAIL)"
} >"$WORK/final.txt" 2>&1
cat "$WORK/final.txt" >>"$SUMMARY"
cat "$WORK/final.txt"
echo "results in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit "$FAILED"
