#!/usr/bin/env bash
# One-call GPU check of cctk (issue 6): build the extension with its CUDA kernels, run the CUDA
# and Triton tests, then the GPU benchmarks; prints a short table LAST.
#
#   bench/gpu_check.sh OUT_DIR [--dry-run]
#
# Needs: one CUDA GPU, python3 with torch (CUDA build), triton, pytest, nvcc (CUDA toolkit); no
# internet. Fits in ~8 minutes: build <= 200 s (sm_90 only unless TORCH_CUDA_ARCH_LIST is set),
# tests <= 150 s, benchmarks get the rest of GPU_CHECK_BUDGET (default 450 s in all).
# Writes into OUT_DIR: build.log, tests.log, bench.log, bench_stdout.log, results.json, table.txt,
# check.log (+ sanitize.log with GPU_CHECK_SANITIZE=1: compute-sanitizer memcheck/racecheck of
# small calls of the ext ops, ~1-2 extra minutes; raise GPU_CHECK_BUDGET to keep the bench time).
# --dry-run: no build, the CPU smoke run of the benchmark script (tests skip without a GPU).
set -u -o pipefail

OUT_DIR=${1:-}
if [ -z "$OUT_DIR" ] || [ "$OUT_DIR" = "-h" ] || [ "$OUT_DIR" = "--help" ]; then
    sed -n '2,12p' "$0"; exit 2
fi
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
T0=$(date +%s)
CHECK_LOG="$OUT_DIR/check.log"
: > "$CHECK_LOG"
log() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$CHECK_LOG"; }
elapsed() { echo $(( $(date +%s) - T0 )); }

# ---- environment
log "repo $ROOT, out $OUT_DIR, python $($PY -c 'import sys; print(sys.version.split()[0])' 2>&1)"
$PY - <<'EOF' 2>&1 | tee -a "$CHECK_LOG"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton unavailable:", e)
EOF
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
        --format=csv 2>&1 | tee -a "$CHECK_LOG"
fi
(command -v git >/dev/null 2>&1 && git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -20) \
    >> "$CHECK_LOG" 2>&1 || true

# ---- CUDA toolkit: $CUDA_HOME, then the usual places, then the directory of nvcc
find_cuda_home() {
    local c nv d
    for c in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13 /opt/cuda \
             /usr/local/cuda-*; do
        if [ -n "$c" ] && [ -f "$c/include/cuda_runtime.h" ] && [ -x "$c/bin/nvcc" ]; then echo "$c"; return 0; fi
    done
    if nv=$(command -v nvcc 2>/dev/null); then
        d=$(cd "$(dirname "$(readlink -f "$nv")")/.." && pwd)
        if [ -f "$d/include/cuda_runtime.h" ]; then echo "$d"; return 0; fi
    fi
    return 1
}

BUILD_STATUS="skipped (dry run)"
if [ "$DRY" = 0 ]; then
    if CH=$(find_cuda_home); then
        export CUDA_HOME="$CH"
        export PATH="$CUDA_HOME/bin:$PATH"
        log "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -2 | head -1))"
    else
        log "no CUDA toolkit found (CUDA_HOME, /usr/local/cuda*, nvcc on PATH): the CUDA build will fail"
    fi
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; p=torch.cuda.get_device_capability(0); print(f"{p[0]}.{p[1]}")' 2>/dev/null || echo "8.0;9.0")}
    export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
    log "building: CCTK_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS pip install --no-build-isolation --no-deps -e ."
    if CCTK_FORCE_CUDA=1 timeout 200 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT_DIR/build.log" 2>&1; then
        BUILD_STATUS="pip install -e OK"
    else
        log "pip install failed (rc $?, see build.log); trying setup.py build_ext --inplace"
        if CCTK_FORCE_CUDA=1 timeout $(( 230 - $(elapsed) > 30 ? 230 - $(elapsed) : 30 )) \
                $PY setup.py build_ext --inplace >> "$OUT_DIR/build.log" 2>&1; then
            BUILD_STATUS="build_ext --inplace OK"
        else
            BUILD_STATUS="FAILED (see build.log)"
            tail -30 "$OUT_DIR/build.log" | tee -a "$CHECK_LOG"
        fi
    fi
    log "build: $BUILD_STATUS ($(elapsed)s)"
fi
EXT_INFO=$($PY -c 'import warnings; warnings.simplefilter("ignore"); import cctk; from cctk import _ext; print(_ext.info())' 2>&1 | tail -1)
log "extension: $EXT_INFO"
case "$EXT_INFO" in
    *"'cuda_kernels': True"*) ;;
    *) [ "$DRY" = 0 ] && BUILD_STATUS="$BUILD_STATUS; !! NO CUDA KERNELS IN cctk._C" ;;
esac

# ---- optional: compute-sanitizer (memcheck, racecheck) over small calls of the three ext ops
if [ "${GPU_CHECK_SANITIZE:-0}" = 1 ] && [ "$DRY" = 0 ]; then
    SAN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null || true)
    if [ -n "$SAN" ]; then
        cat > "$OUT_DIR/sanitize_ops.py" <<'PYEOF'
import importlib, torch, cctk
bl = importlib.import_module("cctk.ops.bsr_linear")
for dtype in (torch.bfloat16, torch.float32):
    for (i, o, B, M) in ((40, 72, 16, 33), (44, 100, 32, 5), (96, 80, 64, 130)):
        g = torch.Generator().manual_seed(0)
        mask = (torch.rand(-(-o // B), -(-i // B), generator=g) < 0.5).cuda()
        w = torch.randn(o, i, device="cuda", dtype=dtype)
        v, crow, col = bl.dense_to_bsr(w, mask, B)
        x = torch.randn(M, i, device="cuda", dtype=dtype, requires_grad=True)
        v.requires_grad_(True)
        y = bl.bsr_linear(x, v, crow, col, None, o, backend="ext")
        y.backward(torch.randn_like(y))
torch.cuda.synchronize()
print("sanitized calls done")
PYEOF
        for tool in memcheck racecheck; do
            log "compute-sanitizer --tool $tool (small ext calls)"
            timeout 120 "$SAN" --tool $tool --print-limit 20 --kernel-name kns=bsr_ \
                $PY "$OUT_DIR/sanitize_ops.py" >> "$OUT_DIR/sanitize.log" 2>&1
            log "  $tool rc $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT_DIR/sanitize.log" | tail -1)"
        done
        rm -f "$OUT_DIR/sanitize_ops.py"
    else
        log "GPU_CHECK_SANITIZE=1 but no compute-sanitizer found"
    fi
fi

# ---- tests
XDIST=""
$PY -c "import xdist" >/dev/null 2>&1 && XDIST="-n 8"
log "tests: pytest tests/test_cuda.py tests/test_bsr_triton.py -q $XDIST"
timeout 150 $PY -m pytest tests/test_cuda.py tests/test_bsr_triton.py -q -p no:cacheprovider $XDIST \
    -o addopts="" > "$OUT_DIR/tests.log" 2>&1
TEST_RC=$?
TEST_LINE=$(grep -E "passed|failed|error|skipped" "$OUT_DIR/tests.log" | tail -1)
[ "$TEST_RC" = 124 ] && TEST_LINE="TIMED OUT after 150 s; last: $TEST_LINE"
grep -E "^(FAILED|ERROR)" "$OUT_DIR/tests.log" | head -15 | tee -a "$CHECK_LOG"
log "tests: rc $TEST_RC: $TEST_LINE"

# ---- benchmarks: the rest of the budget
LEFT=$(( BUDGET - $(elapsed) - 15 ))
[ "$LEFT" -lt 60 ] && LEFT=60
BENCH_ARGS=("$OUT_DIR" --budget "$LEFT")
[ "$DRY" = 1 ] && BENCH_ARGS=("$OUT_DIR" --budget 60 --dry-run)
log "bench: gpu_bench.py ${BENCH_ARGS[*]}"
PYTHONUNBUFFERED=1 timeout $(( LEFT + 30 )) $PY bench/gpu_bench.py "${BENCH_ARGS[@]}" > "$OUT_DIR/bench_stdout.log" 2>&1
BENCH_RC=$?
log "bench: rc $BENCH_RC ($(elapsed)s in all)"

# ---- summary, then the table LAST
echo
echo "== gpu_check summary ($(elapsed)s): build: $BUILD_STATUS | tests: $TEST_LINE | bench rc $BENCH_RC | files: $OUT_DIR"
if [ -f "$OUT_DIR/table.txt" ]; then
    cat "$OUT_DIR/table.txt"
else
    echo "no table: the benchmark script did not finish; last lines of its output:"
    tail -25 "$OUT_DIR/bench_stdout.log"
fi
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
