#!/usr/bin/env bash
# The GPU session. One device call does it all (the device lends 15 minutes in all, its start
# included, and at most 10 per command):
#
#   bash benchmarks/gpu_session.sh             # = session: build (sm_90), python -m gmp_ext, the
#                                              # kernel tests on CUDA, copy + apply + select
#                                              # benchmarks (fp32, bf16); about 8 minutes
#
# Longer stages, one device call each, for a session with time to spare after that:
#
#   bash benchmarks/gpu_session.sh build-test  # build, diagnostics, every test on CUDA, then the
#                                              # opt-in >2^31-element test
#   bash benchmarks/gpu_session.sh bench       # copy ceiling, apply fp32 + bf16, select fp32
#   bash benchmarks/gpu_session.sh bench-bf16  # 2:4 semi-structured forward (< 60 s), select bf16
#
# Run from the repository root. Logs and JSON rows are written to $WORK (default
# /tmp/gmp_ext_gpu_session) and packed at the end into $OUT/session.tar.gz beside
# $OUT/summary.txt, the short table also printed last: the device returns at most 8 files from
# $OUT. Every stage first builds and installs gmp_ext unless the installed copy was built from
# exactly these sources (a hash of csrc/, src/gmp_ext/, CMakeLists.txt, pyproject.toml and the
# architecture list, stored beside the package).
#
# Environment: GMP_EXT_CUDA_ARCHS (default 90), MODELS (default "resnet50 bert_base llama_7b"),
# PYTEST_STOP (default --maxfail=10; -x stops at the first failure), STAGE_SECONDS (the deadline
# the stage keeps: 480 for session, else 560, inside the device's 10 minutes per command),
# DEVICE (default cuda; DEVICE=cpu smoke-tests the bench stages on a machine without a GPU) and
# BENCH_ARGS (extra arguments for every benchmark script, e.g. "--repeats 2").
set -uo pipefail

stage=${1:-session}
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-$PWD/out}
WORK=${WORK:-/tmp/gmp_ext_gpu_session}
mkdir -p "$OUT" "$WORK"
export OUT WORK PYTHONUNBUFFERED=1 GMP_EXT_BENCH_OUT="$WORK"
export GMP_EXT_CUDA_ARCHS=${GMP_EXT_CUDA_ARCHS:-90}
MODELS=${MODELS:-resnet50 bert_base llama_7b}
DEVICE=${DEVICE:-cuda}
BENCH_ARGS=${BENCH_ARGS:-}
PYTEST_STOP=${PYTEST_STOP:---maxfail=10}
if [[ "$stage" == session ]]; then
    STAGE_SECONDS=${STAGE_SECONDS:-480}
else
    STAGE_SECONDS=${STAGE_SECONDS:-560}
fi
PY=python3
status=0

log() { printf '\n=== [%4ds] %s\n' "$SECONDS" "$*"; }

# Seconds left before this stage's deadline, at most $1.
budget() {
    local left=$((STAGE_SECONDS - SECONDS))
    ((left < 1)) && left=1
    ((left > $1)) && left=$1
    echo "$left"
}

gpu_summary() {
    log "GPU"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit \
            --format=csv || true
    else
        echo "nvidia-smi not found"
    fi
}

source_hash() {
    {
        echo "archs=$GMP_EXT_CUDA_ARCHS"
        find csrc src CMakeLists.txt pyproject.toml -type f \
            ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name '*.so' -print0 |
            LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha256sum | cut -c1-16
}

# The stamp of the installed build, or nothing ("-P": the source tree must not shadow it).
installed_hash() {
    $PY -P - <<'EOF' 2>/dev/null
import pathlib, gmp_ext, gmp_ext._C
stamp = pathlib.Path(gmp_ext.__file__).parent / "SOURCE_HASH"
print(stamp.read_text().strip() if stamp.exists() else "")
EOF
}

build() {
    local want have
    want=$(source_hash)
    have=$(installed_hash)
    if [[ -n "$have" && "$have" == "$want" ]]; then
        log "build: installed gmp_ext matches the sources ($want), not rebuilt"
        return 0
    fi
    log "build: GMP_EXT_CUDA_ARCHS=$GMP_EXT_CUDA_ARCHS pip install (log: $WORK/build.log)"
    local start=$SECONDS
    if ! timeout -k 10 "$(budget "${1:-420}")" $PY -m pip install --no-build-isolation --no-deps -v \
        --config-settings=build-dir=build/gpu-session . >"$WORK/build.log" 2>&1; then
        tail -n 60 "$WORK/build.log"
        echo "BUILD FAILED"
        pack
        exit 1
    fi
    $PY -P - "$want" <<'EOF' || exit 1
import pathlib, sys, gmp_ext
(pathlib.Path(gmp_ext.__file__).parent / "SOURCE_HASH").write_text(sys.argv[1] + "\n")
EOF
    grep -E "gmp_ext: CUDA|Successfully installed|warning" "$WORK/build.log" | head -n 20
    echo "built in $((SECONDS - start)) s"
}

diagnostics() {
    log "python -m gmp_ext"
    $PY -P -m gmp_ext || status=1
}

pytest_timeout_args() {
    # pytest-timeout is on the device image; it turns a hung kernel into a stack dump.
    if $PY -c "import pytest_timeout" 2>/dev/null; then
        echo "--timeout=150 --timeout-method=thread"
    fi
}

tests() {
    log "tests on CUDA (log: $WORK/tests.log)"
    # shellcheck disable=SC2046,SC2086
    GMP_EXT_TEST_DEVICE=cuda timeout -k 10 "$(budget 330)" $PY -P -m pytest -q -rfEs \
        $PYTEST_STOP --durations=15 $(pytest_timeout_args) tests/ 2>&1 |
        tee "$WORK/tests.log" || status=1
    log "slow test: > 2^31 elements (log: $WORK/tests_slow.log)"
    # shellcheck disable=SC2046
    GMP_EXT_TEST_DEVICE=cuda timeout -k 10 "$(budget 150)" $PY -P -m pytest -q -rfEs -m slow \
        $(pytest_timeout_args) tests/test_cuda.py 2>&1 | tee "$WORK/tests_slow.log" || status=1
}

bench() {
    # $1: "apply+fp32" or "bf16"
    log "benchmarks (log: $WORK/bench.log)"
    {
        if [[ "$1" == "apply+fp32" ]]; then
            timeout -k 10 "$(budget 60)" $PY benchmarks/bench_copy.py --device "$DEVICE" ||
                echo "bench_copy failed: $?"
            # shellcheck disable=SC2086
            timeout -k 10 "$(budget 150)" $PY benchmarks/bench_apply_masks.py --device "$DEVICE" \
                --models $MODELS --dtype float32 bfloat16 $BENCH_ARGS ||
                echo "bench_apply_masks failed: $?"
            dtype=float32
        else
            # shellcheck disable=SC2086
            timeout -k 10 "$(budget 60)" $PY benchmarks/bench_semi_structured.py $BENCH_ARGS ||
                echo "bench_semi_structured failed: $?"
            dtype=bfloat16
        fi
        # shellcheck disable=SC2086
        timeout -k 10 "$(budget 420)" $PY benchmarks/bench_select.py --device "$DEVICE" \
            --models $MODELS --dtype "$dtype" $BENCH_ARGS || echo "bench_select failed: $?"
    } 2>&1 | tee -a "$WORK/bench.log"
}

# The kernel tests on CUDA: selection, masks, apply, the fused prune step, N:M, operators, plans.
kernel_tests() {
    log "kernel tests on CUDA (log: $WORK/tests.log)"
    # shellcheck disable=SC2046,SC2086
    GMP_EXT_TEST_DEVICE=cuda timeout -k 10 "$(budget "$1")" $PY -P -m pytest -q -rfEs \
        $PYTEST_STOP --durations=10 $(pytest_timeout_args) tests/test_cuda.py tests/test_select.py \
        tests/test_bitmask.py tests/test_apply_masks.py tests/test_prune.py tests/test_nm.py \
        tests/test_library.py tests/test_plan.py tests/test_backend.py 2>&1 |
        tee "$WORK/tests.log" || status=1
}

# Copy ceiling, fused apply and the prune-step rows (gmp_ext, one read of the weights, kthvalue
# and topk loops) in fp32 and bf16, each script under its own deadline.
key_benchmarks() {
    log "key benchmarks (log: $WORK/bench.log)"
    {
        timeout -k 10 "$(budget 30)" $PY benchmarks/bench_copy.py --device "$DEVICE" ||
            echo "bench_copy failed: $?"
        # shellcheck disable=SC2086
        timeout -k 10 "$(budget 90)" $PY benchmarks/bench_apply_masks.py --device "$DEVICE" \
            --models $MODELS --dtype float32 bfloat16 --repeats 10 $BENCH_ARGS ||
            echo "bench_apply_masks failed: $?"
        for dtype in float32 bfloat16; do
            # shellcheck disable=SC2086
            timeout -k 10 "$(budget $(((STAGE_SECONDS - SECONDS) / 2)))" $PY benchmarks/bench_select.py \
                --device "$DEVICE" --models $MODELS --dtype "$dtype" --max-call-s 20 \
                --providers gmp_ext _foreach_norm kthvalue topk $BENCH_ARGS ||
                echo "bench_select $dtype failed: $?"
        done
    } 2>&1 | tee -a "$WORK/bench.log"
}

summary() {
    log "summary"
    $PY benchmarks/utils.py summarize "$WORK/copy_$DEVICE.json" "$WORK"/apply_masks_"$DEVICE"_*.json \
        "$WORK"/select_"$DEVICE"_*.json "$WORK/semi_structured_cuda.json" >"$WORK/summary.txt" 2>&1
    grep -E "passed|failed|error" "$WORK/tests.log" 2>/dev/null | tail -n 3 >>"$WORK/summary.txt"
    cp "$WORK/summary.txt" "$OUT/summary.txt"
}

# Everything of $WORK in one archive: the device returns at most 8 files from $OUT.
pack() {
    tar -czf "$OUT/session.tar.gz" -C "$WORK" . 2>/dev/null || echo "packing $WORK failed"
}

case "$stage" in
session)
    gpu_summary
    build 240
    diagnostics
    kernel_tests 150
    key_benchmarks
    ;;
build-test)
    gpu_summary
    build
    diagnostics
    tests
    ;;
bench)
    gpu_summary
    build
    bench apply+fp32
    ;;
bench-bf16)
    gpu_summary
    build
    bench bf16
    ;;
all)
    STAGE_SECONDS=100000
    gpu_summary
    build
    diagnostics
    tests
    bench apply+fp32
    bench bf16
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh [session|build-test|bench|bench-bf16|all]" >&2
    exit 2
    ;;
esac
summary
pack
log "done: stage $stage, exit $status, ${SECONDS} s; in $OUT: session.tar.gz (logs and JSON rows of $WORK), summary.txt"
cat "$OUT/summary.txt"
exit "$status"
