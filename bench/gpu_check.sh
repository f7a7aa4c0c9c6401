#!/usr/bin/env bash
# Single-shot GPU check of cctk (issue 12): ONE call on a lent GPU, no rerun (a lent H200 has ~15
# minutes in all, 1-3 of them for its start). Give the call timeout_s of about 500.
#
#   bash bench/gpu_check.sh OUT_DIR             # on the GPU machine
#   bash bench/gpu_check.sh --plan              # each section's budget; last line "total N s"
#   bash bench/gpu_check.sh OUT_DIR --dry-run   # anywhere: no build, no GPU; the benchmark
#                                               # script's CPU dry run, the files and the table
#
# Order: environment + nvidia-smi; the extension build starts in the background (MAX_JOBS =
# cores, this GPU's architecture only) while the Triton tests and the Triton / dense / torch-BSR
# timings run; after the build: an ext smoke test at 16384 rows per block size, compute-sanitizer
# memcheck (no caching allocator), the ext tests, graph-timed ext rows (1024->4096 first, then
# 256/512 at 8192/16384 rows, then backward), the label-stats kernels timed directly, the pruned
# CCT if time remains. results.json is written after every section; the table is printed LAST.
# Files in OUT_DIR (7): check.log build.log tests.log sanitize.log bench.log results.json table.txt
# Needs python3 with torch (CUDA), triton, pytest, nvcc; no internet. GPU_CHECK_TOTAL (default
# 480) scales nothing: it is the deadline after which the remaining sections are skipped.
set -u -o pipefail

# ---- the plan: name, budget in seconds, what. "build" runs beside the two sections after it,
# so it counts once, as the longest of the three (its own budget).
PLAN=(
  "env          10  environment, nvidia-smi, CUDA toolkit"
  "build       210  extension build in the background (sm of this GPU, MAX_JOBS = cores); beside it:"
  "triton_tests 95  | pytest: Triton tests (tests/test_bsr_triton.py, test_label_stats.py, test_cuda.py -k triton/label_stats)"
  "triton_bench 95  | gpu_bench: ceilings + linear, providers dense/triton/torch_bsr"
  "ext_smoke    25  pytest tests/test_cuda.py -k timed_shapes: ext fwd + input grad, 16384 rows, B = 16/32/64"
  "memcheck     45  compute-sanitizer memcheck of bench/sanitize_ext.py, PYTORCH_NO_CUDA_MEMORY_CACHING=1"
  "ext_tests    60  pytest tests/test_cuda.py: the other ext / label_sum / ANDCLinear tests"
  "ext_bench    70  gpu_bench: linear (dense/ext, graph-timed under 0.2 ms) then backward"
  "snp_bench    25  gpu_bench snp: label-stats kernels directly, the op's Python overhead apart"
  "cct_bench    30  gpu_bench cct: pruned vs dense CCT-7/3x1 in CUDA graphs (and any time left)"
  "table         5  summary and the table, last"
)
sec_budget() { local l want=$1; for l in "${PLAN[@]}"; do set -- $l; [ "$1" = "$want" ] && { echo "$2"; return; }; done; }
plan_total() {  # sequential sections + the build block (build beside triton_tests + triton_bench)
    local t=0 l name b par=0
    for l in "${PLAN[@]}"; do
        set -- $l; name=$1; b=$2
        case "$name" in
            triton_tests|triton_bench) par=$(( par + b )) ;;
            *) t=$(( t + b )) ;;
        esac
    done
    local bb; bb=$(sec_budget build)
    [ "$par" -gt "$bb" ] && t=$(( t - bb + par ))
    echo "$t"
}

if [ "${1:-}" = "--plan" ]; then
    for l in "${PLAN[@]}"; do set -- $l; n=$1; b=$2; shift 2; printf '%-13s %4s s  %s\n' "$n" "$b" "$*"; done
    echo "total $(plan_total) s"
    exit 0
fi

OUT_DIR=${1:-}
if [ -z "$OUT_DIR" ] || [ "$OUT_DIR" = "-h" ] || [ "$OUT_DIR" = "--help" ]; then
    sed -n '2,19p' "$0"; exit 2
fi
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # the source tree, built in place
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_TOTAL:-$(plan_total)}
T0=$(date +%s)
STATE=$(mktemp -d)              # scratch outside OUT_DIR (at most 7 files there)
trap 'rm -rf "$STATE"' EXIT
CHECK_LOG="$OUT_DIR/check.log"
: > "$CHECK_LOG"; : > "$OUT_DIR/tests.log"; : > "$OUT_DIR/build.log"; : > "$OUT_DIR/sanitize.log"
rm -f "$OUT_DIR/results.json" "$OUT_DIR/table.txt" "$OUT_DIR/bench.log"
log() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$CHECK_LOG"; }
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL - $(elapsed) )); }
SUMMARY=()
note() { SUMMARY+=("$*"); log "$*"; }

# run_pytest NAME BUDGET ARGS...: pytest into tests.log, capped at BUDGET seconds
XDIST=""
$PY -c "import xdist" >/dev/null 2>&1 && XDIST="-n 4"
run_pytest() {
    local name=$1 b=$2; shift 2
    [ "$(left)" -lt 10 ] && { note "$name: skipped (deadline)"; return; }
    [ "$b" -gt "$(left)" ] && b=$(left)
    echo "===== $name: pytest $* (cap ${b}s)" >> "$OUT_DIR/tests.log"
    timeout "$b" $PY -m pytest -q -p no:cacheprovider -o addopts="" "$@" >> "$OUT_DIR/tests.log" 2>&1
    local rc=$? line
    line=$(grep -E "[0-9]+ (passed|failed|error|skipped)" "$OUT_DIR/tests.log" | tail -1)
    [ "$rc" = 124 ] && line="TIMED OUT after ${b}s"
    note "$name: rc $rc: $line"
}
# run_bench NAME BUDGET ARGS...: gpu_bench.py sections appended to results.json / bench.log
run_bench() {
    local name=$1 b=$2; shift 2
    [ "$(left)" -lt 15 ] && { note "$name: skipped (deadline)"; return; }
    [ "$b" -gt "$(left)" ] && b=$(left)
    local args=("$OUT_DIR" --append --budget $(( b > 20 ? b - 10 : 10 )) "$@")
    [ "$DRY" = 1 ] && args+=(--dry-run)
    log "$name: gpu_bench.py ${args[*]}"
    timeout $(( b + 15 )) $PY bench/gpu_bench.py "${args[@]}" > "$STATE/$name.out" 2>&1
    local rc=$?
    grep -vE '^\[ *[0-9.]+s\]' "$STATE/$name.out" | grep -iE "error|traceback|warn" | head -5 >> "$CHECK_LOG"
    note "$name: rc $rc"
}

# ---- env
log "repo $ROOT, out $OUT_DIR, deadline ${TOTAL}s, dry run $DRY"
$PY - <<'EOF' 2>&1 | tee -a "$CHECK_LOG"
import os, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cpus", os.cpu_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "L2 MiB", round(getattr(p, "L2_cache_size", 0) / 2**20, 1), "mem GiB", round(p.total_memory / 2**30, 1))
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton unavailable:", e)
EOF
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
        --format=csv 2>&1 | tee -a "$CHECK_LOG"
fi
(command -v git >/dev/null 2>&1 && git rev-parse HEAD && git status --short | head -20) >> "$CHECK_LOG" 2>&1 || true

find_cuda_home() {  # $CUDA_HOME, the usual places, then the real nvcc behind the one on PATH
    local c nv real
    for c in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13 /opt/cuda \
             /usr/local/cuda-*; do
        if [ -n "$c" ] && [ -f "$c/include/cuda_runtime.h" ] && [ -x "$c/bin/nvcc" ]; then echo "$c"; return 0; fi
    done
    if nv=$(command -v nvcc 2>/dev/null); then
        real=$(grep -oE '/[^ "]*/bin/nvcc' "$nv" 2>/dev/null | head -n 1)
        [ -n "$real" ] || real=$(readlink -f "$nv")
        c=$(cd "$(dirname "$real")/.." && pwd)
        if [ -f "$c/include/cuda_runtime.h" ]; then echo "$c"; return 0; fi
    fi
    return 1
}

# ---- build, in the background
BUILD_PID=""
if [ "$DRY" = 0 ]; then
    if CH=$(find_cuda_home); then
        export CUDA_HOME="$CH" PATH="$CH/bin:$PATH"
        log "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -2 | head -1))"
    else
        note "no CUDA toolkit found (CUDA_HOME, /usr/local/cuda*, nvcc on PATH): the CUDA build will fail"
    fi
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; p=torch.cuda.get_device_capability(0); print(f"{p[0]}.{p[1]}")' 2>/dev/null || echo "9.0")}
    export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
    log "build (background): CCTK_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS setup.py build_ext --inplace"
    ( CCTK_FORCE_CUDA=1 timeout "$(sec_budget build)" $PY setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1
      echo $? > "$STATE/build_rc" ) &
    BUILD_PID=$!
fi

# ---- beside the build: Triton tests and the Triton / dense / torch-BSR timings
if [ "$DRY" = 0 ]; then
    run_pytest triton_tests "$(sec_budget triton_tests)" $XDIST tests/test_bsr_triton.py tests/test_label_stats.py \
        tests/test_cuda.py -k "triton or label_stats"
fi
run_bench triton_bench "$(sec_budget triton_bench)" --sections ceilings,linear --providers dense,triton,torch_bsr

# ---- the build's end
BUILD_STATUS="skipped (dry run)"
if [ -n "$BUILD_PID" ]; then
    wait "$BUILD_PID"
    BRC=$(cat "$STATE/build_rc" 2>/dev/null || echo "?")
    case "$BRC" in
        0) BUILD_STATUS="OK" ;;
        124) BUILD_STATUS="TIMED OUT after $(sec_budget build)s (see build.log)" ;;
        *) BUILD_STATUS="FAILED rc $BRC (see build.log)"; tail -20 "$OUT_DIR/build.log" >> "$CHECK_LOG" ;;
    esac
    note "build: $BUILD_STATUS ($(elapsed)s)"
fi
EXT_INFO=$($PY -c 'import warnings; warnings.simplefilter("ignore"); import cctk; from cctk import _ext; print(_ext.info())' 2>&1 | tail -1)
log "extension: $EXT_INFO"
EXT_OK=0
case "$EXT_INFO" in *"'cuda_kernels': True"*) EXT_OK=1 ;; esac
[ "$DRY" = 0 ] && [ "$EXT_OK" = 0 ] && note "!! NO CUDA KERNELS IN cctk._C: the ext sections test and time nothing"

# ---- after the build
if [ "$DRY" = 0 ] && [ "$EXT_OK" = 1 ]; then
    run_pytest ext_smoke "$(sec_budget ext_smoke)" tests/test_cuda.py -k timed_shapes
    SAN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null || true)
    if [ -z "$SAN" ]; then
        note "memcheck: no compute-sanitizer found"
    elif [ "$(left)" -lt 20 ]; then
        note "memcheck: skipped (deadline)"
    else
        b=$(sec_budget memcheck)
        log "memcheck: PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SAN --tool memcheck $PY bench/sanitize_ext.py"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$b" "$SAN" --tool memcheck --leak-check no --print-limit 20 \
            --error-exitcode 99 $PY bench/sanitize_ext.py >> "$OUT_DIR/sanitize.log" 2>&1
        rc=$?
        note "memcheck: rc $rc$([ "$rc" = 124 ] && echo " (timed out)"): $(grep -E 'ERROR SUMMARY' "$OUT_DIR/sanitize.log" | tail -1)"
    fi
    run_pytest ext_tests "$(sec_budget ext_tests)" $XDIST tests/test_cuda.py -k "not triton and not label_stats and not timed_shapes"
fi
if [ "$EXT_OK" = 1 ] || [ "$DRY" = 1 ]; then   # the dry run times the C++ (CPU) kernels instead
    run_bench ext_bench "$(sec_budget ext_bench)" --sections linear,backward --providers dense,ext
fi
run_bench snp_bench "$(sec_budget snp_bench)" --sections snp
CCT_B=$(( $(left) - $(sec_budget table) ))
[ "$CCT_B" -gt "$(sec_budget cct_bench)" ] || CCT_B=$(sec_budget cct_bench)
if [ "$EXT_OK" = 1 ] || [ "$DRY" = 1 ]; then
    run_bench cct_bench "$CCT_B" --sections cct
else
    run_bench cct_bench "$CCT_B" --sections cct --providers dense,triton
fi

# ---- summary, then the table LAST
NFILES=$(find "$OUT_DIR" -type f | wc -l)
{
    echo
    echo "== gpu_check summary ($(elapsed)s of ${TOTAL}s; $NFILES files in $OUT_DIR; build: $BUILD_STATUS)"
    for s in "${SUMMARY[@]}"; do echo "  $s"; done
} | tee -a "$CHECK_LOG"
if [ -f "$OUT_DIR/results.json" ]; then
    $PY bench/gpu_bench.py "$OUT_DIR" --table-only 2>&1 | tail -60
else
    echo "no results.json: no benchmark section finished; see check.log and bench.log"
fi
