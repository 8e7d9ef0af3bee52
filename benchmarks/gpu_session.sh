#!/usr/bin/env bash
# The GPU session: one device call per stage. The device lends 15 minutes in all (its start,
# about 1-2 minutes, included) and at most 10 per command, so the plan is `session` (390 s)
# and, if something needs a second look, `quick` (270 s) on the same warm machine:
#
#   bash benchmarks/gpu_session.sh            # = session, 390 s: preflight, build (sm_90),
#                                             # check of the build, CUDA kernel tests (90 s),
#                                             # then the target rows first: select bf16
#                                             # (LLaMA-7B), apply bf16 + fp32 (LLaMA-7B),
#                                             # select fp32 (LLaMA-7B), the scores (BERT-
#                                             # base: magnitude, Wanda, movement steps), then
#                                             # BERT-base and the copy ceiling with what is left
#   bash benchmarks/gpu_session.sh quick      # the rerun, 270 s: preflight, build (skipped
#                                             # when the installed one matches), check,
#                                             # tests/test_cuda.py (45 s), select bf16 and
#                                             # apply (LLaMA-7B)
#   bash benchmarks/gpu_session.sh preflight  # the checks alone (about 10 s), nothing built
#
# Longer stages, one device call each, for a session with time to spare (560 s each):
#
#   bash benchmarks/gpu_session.sh build-test  # every test on CUDA, then the >2^31 test
#   bash benchmarks/gpu_session.sh bench       # apply fp32 + bf16, select fp32, copy ceiling
#   bash benchmarks/gpu_session.sh bench-bf16  # select bf16, 2:4 semi-structured forward
#
# Every stage starts with the preflight and stops at once, exit 3, with the reason on one line
# (also the top of $OUT/summary.txt) when the session could only pass empty: no nvcc (or
# GMP_EXT_CPU_ONLY set), no Python.h for the python3 in use, missing build tools, no CUDA
# device for torch, a device the architectures do not cover, an nvcc newer than the driver.
# After the build the installed gmp_ext._C must report CUDA kernels (build_info()["cuda"]) that
# a driver runs; the CUDA tests must pass at least one CUDA test, with none skipped for want of
# CUDA; a stage with benchmarks must bring back at least one ok gmp_ext row on the GPU.
# DEVICE=cpu (a smoke test of the bench stages without a GPU) skips those GPU checks and says
# so; it never reinstalls a gmp_ext that is imported from this checkout (a link or an editable
# install), since pip would delete the sources through the link.
#
# Run from the repository root. Logs, JUnit XML and JSON rows go to $WORK (default
# /tmp/gmp_ext_gpu_session; its previous logs and rows are cleared), packed at the end into
# $OUT/session.tar.gz beside $OUT/summary.txt (one screen: the steps and the key rows, printed
# last) and $OUT/rows.txt (every row). The build is skipped when the installed copy was built
# from exactly these sources (a hash of csrc/, src/gmp_ext/, CMakeLists.txt, pyproject.toml
# and the architecture list, stored beside the package).
#
# Environment: GMP_EXT_CUDA_ARCHS (default 90: sm_90 + its PTX, one compilation per source),
# CMAKE_BUILD_PARALLEL_LEVEL (default: the CPU count), CUDACXX (the nvcc to use; default the
# one on PATH, else /usr/local/cuda/bin), PYTHON (default python3), DEVICE (default cuda),
# TARGET_MODELS (default llama_7b; DEVICE=cpu: resnet50), MODELS (every model of the long
# stages; default "resnet50 bert_base llama_7b", DEVICE=cpu: resnet50), STAGE_SECONDS (the
# stage's deadline: above), TESTS_SECONDS (the session's test cap, default 90), PYTEST_STOP
# (default --maxfail=10) and BENCH_ARGS (extra arguments for every benchmark script).
set -uo pipefail

stage=${1:-session}
case "$stage" in
preflight | quick | session | build-test | bench | bench-bf16 | all) ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh [session|quick|preflight|build-test|bench|bench-bf16|all]" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-$PWD/out}
WORK=${WORK:-/tmp/gmp_ext_gpu_session}
mkdir -p "$OUT" "$WORK" || exit 2
rm -rf "$WORK/rows"
rm -f "$WORK"/*.log "$WORK"/*.xml "$WORK"/*.txt "$OUT/summary.txt" "$OUT/rows.txt"
export OUT WORK PYTHONUNBUFFERED=1
export GMP_EXT_CUDA_ARCHS=${GMP_EXT_CUDA_ARCHS:-90}
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 8)}
export CMAKE_BUILD_PARALLEL_LEVEL
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
if [[ "$DEVICE" == cuda ]]; then
    TARGET_MODELS=${TARGET_MODELS:-llama_7b}
    MODELS=${MODELS:-resnet50 bert_base llama_7b}
else
    TARGET_MODELS=${TARGET_MODELS:-resnet50}
    MODELS=${MODELS:-resnet50}
fi
BENCH_ARGS=${BENCH_ARGS:-}
PYTEST_STOP=${PYTEST_STOP:---maxfail=10}
TESTS_SECONDS=${TESTS_SECONDS:-90}
case "$stage" in
preflight) STAGE_SECONDS=${STAGE_SECONDS:-60} ;;
quick) STAGE_SECONDS=${STAGE_SECONDS:-270} ;;
session) STAGE_SECONDS=${STAGE_SECONDS:-390} ;;
all) STAGE_SECONDS=${STAGE_SECONDS:-100000} ;;
*) STAGE_SECONDS=${STAGE_SECONDS:-560} ;;
esac
RESERVE=15 # seconds kept for the summary and the archive
status=0
failure=""
step=preflight

log() { printf '\n=== [%4ds] %s\n' "$SECONDS" "$*"; }

# One line per step in $WORK/steps.txt (the summary's body): step, OK|FAIL|CUT|SKIP, what.
note() {
    printf '%-13s %-4s %s\n' "$1" "$2" "$3" | tee -a "$WORK/steps.txt"
}

# Seconds a step may take: at most $1, and what the stage's deadline leaves after RESERVE.
budget() {
    local left=$((STAGE_SECONDS - SECONDS - RESERVE))
    ((left > $1)) && left=$1
    ((left < 0)) && left=0
    echo "$left"
}

# Stops the stage at once: the reason on one line, first in $OUT/summary.txt.
die() {
    failure="$*"
    ((status == 0)) && status=${DIE_STATUS:-1}
    note "$step" FAIL "$failure"
    echo "FAILED at $step: $failure"
    finish
}

# The nvcc the build will use: $CUDACXX, else nvcc on PATH, else a CUDA install's.
find_nvcc() {
    if [[ -n "${CUDACXX:-}" ]]; then
        [[ -x "$CUDACXX" ]] && echo "$CUDACXX"
        return 0
    fi
    local c
    for c in "$(command -v nvcc 2>/dev/null)" /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc /opt/cuda/bin/nvcc; do
        if [[ -n "$c" && -x "$c" ]]; then
            echo "$c"
            return 0
        fi
    done
}

# Before any build, about 10 s: every problem found, on one line, or the facts the build uses.
preflight() {
    step=preflight
    log "preflight (stage $stage, DEVICE=$DEVICE)"
    # problems: the python side's first (the device, the one a session most often lacks).
    local problems=() shell_problems=() nvcc="" nvcc_release="" cpu_only=${GMP_EXT_CPU_ONLY:-} lines line
    if [[ "$DEVICE" == cuda ]]; then
        case "${cpu_only,,}" in
        "" | off | 0 | false | no) ;;
        *) shell_problems+=("GMP_EXT_CPU_ONLY=$cpu_only is set: the build would skip the CUDA kernels") ;;
        esac
        nvcc=$(find_nvcc)
        if [[ -z "$nvcc" ]]; then
            if [[ -n "${CUDACXX:-}" ]]; then
                shell_problems+=("nvcc not found: CUDACXX=$CUDACXX is not executable, the build would be CPU-only")
            else
                shell_problems+=("nvcc not found (CUDACXX unset, none on PATH or in /usr/local/cuda*/bin): the build would be CPU-only")
            fi
        else
            nvcc_release=$("$nvcc" --version 2>/dev/null | grep -o 'release [0-9]*\.[0-9]*' | cut -d' ' -f2)
            if [[ -z "$nvcc_release" ]]; then
                shell_problems+=("$nvcc --version does not answer")
            else
                export CUDACXX=$nvcc
                echo "preflight: nvcc $("$nvcc" --version | grep -o 'V[0-9][0-9.]*' | head -n 1) at $nvcc (the build's CUDACXX); GMP_EXT_CUDA_ARCHS=$GMP_EXT_CUDA_ARCHS; CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL"
            fi
        fi
    else
        echo "preflight: DEVICE=$DEVICE: GPU checks skipped (nvcc, torch.cuda device, CUDA kernels in the build)"
    fi
    if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null; then
        shell_problems+=("no C++ compiler (c++, g++) on PATH")
    fi
    # The python side: Python.h, build tools, torch and the device. "PROBLEM ..." lines are
    # problems, the rest is printed.
    lines=$(timeout -k 5 60 "$PY" - "$DEVICE" "$GMP_EXT_CUDA_ARCHS" "$nvcc_release" <<'EOF' 2>&1
import ctypes, glob, importlib, os, re, shutil, subprocess, sys, sysconfig

device, archs, nvcc_release = sys.argv[1:4]
problems = []  # (order, text): the device first, it is what a session most often lacks
ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
print(f"preflight: python {sys.version.split()[0]} at {sys.executable}")
include = sysconfig.get_paths()["include"]
if os.path.isfile(os.path.join(include, "Python.h")):
    print(f"preflight: Python.h in {include}")
else:
    found = sorted(
        {
            os.path.dirname(p)
            for pattern in (f"/usr/include/python{ver}*/Python.h",
                            f"/usr/local/include/python{ver}*/Python.h",
                            f"{sys.base_prefix}/include/python{ver}*/Python.h")
            for p in glob.glob(pattern)
        }
    )
    elsewhere = f"; one is in {', '.join(found)}" if found else ""
    problems.append((2, f"Python.h missing for {sys.executable} (not in {include}: the "
                        f"python{ver} development headers are not installed){elsewhere}"))
for module in ("scikit_build_core", "pybind11", "pip"):
    try:
        m = importlib.import_module(module)
        print(f"preflight: {module} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        problems.append((3, f"{module} not importable ({type(e).__name__}): the build needs it"))
cmake = shutil.which("cmake")
if cmake is None:
    try:
        import cmake as cmake_module
        cmake = os.path.join(cmake_module.CMAKE_BIN_DIR, "cmake")
    except Exception:  # noqa: BLE001
        cmake = None
if cmake is None:
    problems.append((3, "cmake not found (PATH or the cmake package): the build needs >= 3.24"))
else:
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"(\d+)\.(\d+)", out)
    if m and (int(m[1]), int(m[2])) < (3, 24):
        problems.append((3, f"cmake {m[0]} at {cmake} is older than 3.24"))
    else:
        print(f"preflight: cmake {m[0] if m else '?'} at {cmake}; ninja {shutil.which('ninja') or 'not found (make is used)'}")
try:
    import torch
except Exception as e:  # noqa: BLE001
    problems.append((1, f"torch not importable ({type(e).__name__}: {e})"))
    torch = None
if torch is not None:
    print(f"preflight: torch {torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU-only torch build'})")
if device == "cuda" and torch is not None:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        driver = v.value if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 else None
        driver_text = f"driver CUDA {driver // 1000}.{driver % 1000 // 10}" if driver else "driver version unknown"
    except OSError:
        driver, driver_text = None, "no NVIDIA driver (libcuda.so.1 does not load)"
    if not torch.cuda.is_available():
        why = "a CPU-only torch build" if not torch.version.cuda else f"torch CUDA {torch.version.cuda}"
        problems.append((0, f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, {why}; {driver_text})"))
    else:
        p = torch.cuda.get_device_properties(0)
        cc = p.major * 10 + p.minor
        print(f"preflight: CUDA device 0 of {torch.cuda.device_count()}: {p.name}, sm_{cc}, "
              f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; {driver_text}")
        covered = False
        for token in re.split(r"[;, ]+", archs.strip()):
            if token in ("native", "all", "all-major"):
                covered = True
                continue
            m = re.fullmatch(r"(\d+)([a-z]?)(-real|-virtual)?", token)
            if not m:
                continue
            num, kind = int(m[1]), m[3] or ""
            real = kind != "-virtual" and num // 10 == p.major and (num == cc if m[2] else num <= cc)
            ptx = kind != "-real" and not m[2] and num <= cc
            covered = covered or real or ptx
        if not covered:
            problems.append((1, f"GMP_EXT_CUDA_ARCHS={archs} holds no code for this sm_{cc} device"))
    if driver and nvcc_release:
        major = int(nvcc_release.split(".")[0])
        if major > driver // 1000:
            problems.append((1, f"nvcc {nvcc_release} is newer than the {driver_text}: its kernels would not load"))
for _, text in sorted(problems, key=lambda p: p[0]):
    print(f"PROBLEM {text}")
EOF
    )
    local rc=$?
    while IFS= read -r line; do
        if [[ "$line" == "PROBLEM "* ]]; then
            problems+=("${line#PROBLEM }")
        elif [[ -n "$line" ]]; then
            echo "$line"
        fi
    done <<<"$lines"
    if ((rc == 124 || rc == 137)); then
        problems+=("$PY did not answer in 60 s (torch import or CUDA initialisation hung)")
    elif ((rc != 0)); then
        problems+=("the preflight's $PY check exited $rc: $(tail -n 1 <<<"$lines")")
    fi
    problems+=("${shell_problems[@]}")
    if ((${#problems[@]})); then
        local joined
        joined=$(printf '%s | ' "${problems[@]}")
        DIE_STATUS=3 die "${joined% | }"
    fi
    if [[ "$DEVICE" == cuda ]]; then
        note preflight OK "$(printf 'nvcc %s, Python.h, build tools, CUDA device, %s s' "$nvcc_release" "$SECONDS")"
    else
        note preflight OK "DEVICE=$DEVICE: GPU checks skipped; Python.h and build tools present ($SECONDS s)"
    fi
}

gpu_summary() {
    [[ "$DEVICE" == cuda ]] || return 0
    log "GPU"
    if command -v nvidia-smi >/dev/null; then
        timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit \
            --format=csv 2>&1 | tee "$WORK/gpu.txt"
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
    "$PY" -P - <<'EOF' 2>/dev/null
import pathlib, gmp_ext, gmp_ext._C
stamp = pathlib.Path(gmp_ext.__file__).parent / "SOURCE_HASH"
print(stamp.read_text().strip() if stamp.exists() else "")
EOF
}

# Where `import gmp_ext` resolves to (links followed), or nothing.
installed_location() {
    "$PY" -c 'import importlib.util as u, os; s = u.find_spec("gmp_ext"); print(os.path.realpath(os.path.dirname(s.origin)) if s and s.origin else "")' 2>/dev/null
}

build() {
    step=build
    local want have loc t start rc reason
    loc=$(installed_location)
    if [[ -n "$loc" && "$loc/" == "$(pwd -P)/"* ]]; then
        note build SKIP "gmp_ext is imported from this checkout ($loc: a link or an editable install): not reinstalled (pip would delete the sources through it), used as built"
        return 0
    fi
    want=$(source_hash)
    have=$(installed_hash)
    if [[ -n "$have" && "$have" == "$want" ]]; then
        note build OK "the installed gmp_ext matches the sources ($want): not rebuilt"
        return 0
    fi
    t=$(budget "$1")
    ((t < 30)) && die "no time left to build (${t} s before the stage's deadline)"
    log "build: GMP_EXT_CUDA_ARCHS=$GMP_EXT_CUDA_ARCHS CUDACXX=${CUDACXX:-} pip install, deadline $t s (log: $WORK/build.log)"
    start=$SECONDS
    timeout -k 10 "$t" "$PY" -m pip install --no-build-isolation --no-deps --no-index \
        --disable-pip-version-check -v --config-settings=build-dir=build/gpu-session . \
        >"$WORK/build.log" 2>&1
    rc=$?
    if ((rc != 0)); then
        tail -n 40 "$WORK/build.log"
        reason=$(grep -m 1 -E "fatal error|error:|Error:|CMake Error|Could NOT find" "$WORK/build.log" |
            cut -c1-240)
        if ((rc == 124 || rc == 137)); then
            die "build timed out after $t s${reason:+ ($reason)}"
        fi
        die "build failed (pip exit $rc): ${reason:-see build.log}"
    fi
    "$PY" -P - "$want" <<'EOF' || die "could not stamp the installed gmp_ext"
import pathlib, sys, gmp_ext
(pathlib.Path(gmp_ext.__file__).parent / "SOURCE_HASH").write_text(sys.argv[1] + "\n")
EOF
    grep -E "gmp_ext: CUDA|gmp_ext: no CUDA|Successfully installed|warning" "$WORK/build.log" | head -n 20
    note build OK "$((SECONDS - start)) s: $(grep -m 1 -o 'gmp_ext: CUDA.*\|gmp_ext: no CUDA.*' "$WORK/build.log" || echo 'no CMake CUDA line')"
}

# After the build: the installed module must have CUDA kernels that the driver runs.
verify() {
    step=verify
    local out
    if [[ "$DEVICE" != cuda ]]; then
        note verify SKIP "DEVICE=$DEVICE: the check of the build's CUDA kernels is skipped"
        return 0
    fi
    out=$(timeout -k 5 60 "$PY" -P - <<'EOF' 2>&1
import gmp_ext._C as C
from gmp_ext.kernels import backends
info = C.build_info()
print(f"build_info: cuda={info['cuda']} architectures={info['cuda_architectures']!r} "
      f"nvcc={info['cuda_compiler_version']!r}")
if not info["cuda"]:
    print("PROBLEM the installed gmp_ext._C has no CUDA kernels (build_info()['cuda'] is False: "
          "the build did not use nvcc; see build.log)")
elif C.cuda_driver_status() != "ok":
    print(f"PROBLEM the CUDA kernels cannot run: {C.cuda_driver_status()}")
elif not backends.cuda_kernels_available():
    print("PROBLEM gmp_ext.kernels.backends.cuda_kernels_available() is False")
else:  # one kernel launch: "no kernel image for this device" and the like show here
    import torch
    from gmp_ext.kernels import ops
    try:
        ops.select_layerwise([torch.randn(1 << 16, device="cuda")], 0.9)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        print(f"PROBLEM a CUDA selection failed: {type(e).__name__}: {str(e)[:160]}")
EOF
    )
    local rc=$?
    echo "$out"
    if grep -q '^PROBLEM ' <<<"$out"; then
        die "$(grep -m 1 '^PROBLEM ' <<<"$out" | cut -c9-)"
    elif ((rc != 0)); then
        die "importing the installed gmp_ext._C failed (exit $rc): $(tail -n 1 <<<"$out")"
    fi
    note verify OK "$(head -n 1 <<<"$out")"
}

diagnostics() {
    log "python -m gmp_ext"
    timeout -k 5 60 "$PY" -P -m gmp_ext 2>&1 | tee "$WORK/diagnostics.txt"
}

pytest_timeout_args() {
    # pytest-timeout is on the device image: a test over 60 s fails, the run goes on.
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        echo "--timeout=60 --timeout-method=signal"
    fi
}

# $1: the step's name, $2: its cap in seconds, $3: "-m" expression, the rest: test files.
# Fails unless a CUDA test passed and none was skipped for want of CUDA; a run cut at the cap
# with no failure is CUT, not FAIL.
cuda_tests() {
    local name=$1 cap=$2 marks=$3 t rc verdict
    shift 3
    step=$name
    if [[ "$DEVICE" != cuda ]]; then
        note "$name" SKIP "DEVICE=$DEVICE: the CUDA tests are skipped"
        return 0
    fi
    t=$(budget "$cap")
    if ((t < 20)); then
        note "$name" CUT "no time left (stage deadline $STAGE_SECONDS s)"
        return 0
    fi
    log "$name on CUDA, -m \"$marks\", cap $t s (log: $WORK/$name.log)"
    # shellcheck disable=SC2046,SC2086
    GMP_EXT_TEST_DEVICE=cuda timeout -s INT -k 15 "$t" "$PY" -P -m pytest -q -rfEs -m "$marks" \
        -p no:cacheprovider $PYTEST_STOP --durations=10 $(pytest_timeout_args) \
        --junitxml="$WORK/$name.xml" "$@" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    verdict=$("$PY" - "$WORK/$name.xml" "$rc" "$t" <<'EOF'
import os, re, sys
import xml.etree.ElementTree as ET

path, rc, cap = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if not os.path.exists(path):
    how = f"killed at the {cap} s cap (a hung kernel?)" if rc in (124, 137) else f"exit {rc}"
    print(f"FAIL pytest wrote no report ({how}); see the log")
    sys.exit()
NO_CUDA = ("needs a CUDA device", "CUDA kernels unavailable", "gmp_ext._C is not built",
           "got empty parameter set")
counts = dict(passed=0, failed=0, skipped=0, cuda=0, no_cuda=0)
reasons = set()
for case in ET.parse(path).getroot().iter("testcase"):
    tags = {child.tag: child for child in case}
    if "failure" in tags or "error" in tags:
        counts["failed"] += 1
    elif "skipped" in tags:
        counts["skipped"] += 1
        message = tags["skipped"].get("message") or ""
        if any(s in message for s in NO_CUDA):
            counts["no_cuda"] += 1
            reasons.add(message[:60])
    else:
        counts["passed"] += 1
        name, cls = case.get("name", ""), case.get("classname", "")
        if cls.endswith("test_cuda") or re.search(r"[\[-]cuda[\]-]", name):
            counts["cuda"] += 1
total = counts["passed"] + counts["failed"] + counts["skipped"]
text = (f"{counts['cuda']} CUDA tests passed; {counts['passed']} passed, {counts['failed']} "
        f"failed or errors, {counts['skipped']} skipped of {total}")
if counts["failed"]:
    print(f"FAIL {text}")
elif counts["cuda"] == 0 or counts["skipped"] == total:
    print(f"FAIL no CUDA test ran: {text} ({'; '.join(sorted(reasons)) or 'see the log'})")
elif counts["no_cuda"]:
    print(f"FAIL {counts['no_cuda']} skipped for want of CUDA ({'; '.join(sorted(reasons))}): {text}")
elif rc in (124, 137):
    print(f"CUT at the {cap} s cap, none failed: {text}")
elif rc != 0:
    print(f"FAIL pytest exit {rc}: {text}")
else:
    print(f"OK {text}")
EOF
    )
    [[ -n "$verdict" ]] || verdict="FAIL the report of $WORK/$name.xml could not be read"
    note "$name" "${verdict%% *}" "${verdict#* }"
    [[ "$verdict" == FAIL* ]] && status=1
    return 0
}

# $1: the step's name, $2: its cap in seconds, $3: its rows folder under $WORK/rows (a script
# rewrites <kernel>_<device>_<dtype>.json, so each step keeps its own), the rest: the command.
bench_step() {
    local name=$1 cap=$2 dir=$3 t start rc
    shift 3
    step=$name
    t=$(budget "$cap")
    if ((t < 15)); then
        note "$name" CUT "not run: no time left (stage deadline $STAGE_SECONDS s)"
        return 0
    fi
    mkdir -p "$WORK/rows/$dir"
    log "$name, deadline $t s: $* (log: $WORK/bench.log)"
    start=$SECONDS
    GMP_EXT_BENCH_OUT="$WORK/rows/$dir" timeout -k 10 "$t" "$@" 2>&1 | tee -a "$WORK/bench.log"
    rc=${PIPESTATUS[0]}
    if ((rc == 0)); then
        note "$name" OK "$((SECONDS - start)) s"
    elif ((rc == 124 || rc == 137)); then
        note "$name" CUT "stopped at its $t s deadline; the rows measured so far are kept"
    else
        note "$name" FAIL "exit $rc after $((SECONDS - start)) s (see bench.log)"
        status=1
    fi
}

# resnet50 first: its timings let --max-call-s skip a PyTorch loop too slow for the next model.
with_predictor() {
    local m out="resnet50"
    for m in "$@"; do
        [[ "$m" == resnet50 ]] || out+=" $m"
    done
    echo "$out"
}

SELECT_PROVIDERS=(--providers gmp_ext _foreach_norm kthvalue topk)

# shellcheck disable=SC2086
select_rows() { # $1 step, $2 cap, $3 dir, $4 dtypes ("float32 bfloat16"), rest: models
    local name=$1 cap=$2 dir=$3 dtypes=$4
    shift 4
    bench_step "$name" "$cap" "$dir" "$PY" benchmarks/bench_select.py --device "$DEVICE" \
        --models "$@" --dtype $dtypes --max-call-s 20 "${SELECT_PROVIDERS[@]}" $BENCH_ARGS
}

# shellcheck disable=SC2086
apply_rows() { # $1 step, $2 cap, $3 dir, $4 dtypes ("float32 bfloat16"), rest: models
    local name=$1 cap=$2 dir=$3 dtypes=$4
    shift 4
    bench_step "$name" "$cap" "$dir" "$PY" benchmarks/bench_apply_masks.py --device "$DEVICE" \
        --models "$@" --dtype $dtypes --repeats 10 $BENCH_ARGS
}

# The models of MODELS that are not targets.
other_models() {
    local m out=""
    for m in $MODELS; do
        [[ " $TARGET_MODELS " == *" $m "* ]] || out+=" $m"
    done
    echo "${out# }"
}

# The target rows first: bf16 and LLaMA-7B, then fp32, then the other models and the copy.
# shellcheck disable=SC2046,SC2086
target_benchmarks() { # $1: "quick" for the rerun's subset
    select_rows select-bf16 100 1-select-bf16 bfloat16 $(with_predictor $TARGET_MODELS)
    apply_rows apply 45 2-apply "bfloat16 float32" $TARGET_MODELS
    [[ "${1:-}" == quick ]] && return 0
    select_rows select-fp32 90 3-select-fp32 float32 $(with_predictor $TARGET_MODELS)
    bench_step scores 60 3-scores "$PY" benchmarks/bench_scores.py --device "$DEVICE" \
        --models bert_base --dtype bfloat16 float32 --repeats 5
    local others
    others=$(other_models)
    if [[ -n "$others" ]]; then
        select_rows select-more 120 4-more-select "bfloat16 float32" $others
        apply_rows apply-more 40 5-more-apply "bfloat16 float32" $others
    fi
    bench_step copy 20 6-copy "$PY" benchmarks/bench_copy.py --device "$DEVICE"
}

# "Cannot pass empty": a stage with benchmarks on the GPU must bring back an ok gmp_ext row.
require_gpu_rows() {
    if [[ "$DEVICE" != cuda ]]; then
        note rows SKIP "DEVICE=$DEVICE: no GPU rows required"
        return 0
    fi
    step=rows
    local n
    n=$(find "$WORK/rows" -name "*_cuda*.json" -print0 2>/dev/null | xargs -0 -r "$PY" -c '
import json, sys
print(sum(1 for p in sys.argv[1:] for r in json.load(open(p))["rows"]
          if str(r.get("provider", "")).startswith("gmp_ext") and r.get("status") == "ok"))' 2>/dev/null)
    if [[ "${n:-0}" -gt 0 ]]; then
        note rows OK "$n ok gmp_ext rows on the GPU"
    else
        note rows FAIL "no ok gmp_ext benchmark row came back from the GPU"
        status=1
    fi
}

# The key rows for the summary: the gmp_ext rows of the target models and the copy bandwidth.
key_rows() {
    local files=()
    mapfile -d '' files < <(find "$WORK/rows" -name "*.json" -print0 2>/dev/null | LC_ALL=C sort -z)
    ((${#files[@]})) || return 0
    "$PY" - "$TARGET_MODELS" "${files[@]}" <<'EOF' 2>&1
import json, sys
targets = sys.argv[1].split()
# x: against the kthvalue loop (select) or _foreach_mul_ (apply); reads: over one read.
KEY = ("gmp_ext", "gmp_ext prune step (select + build + zero)", "gmp_ext prepared (+ masks)",
       "gmp_ext fused (packed)")
lines, bad, gpu, copy = [], 0, "", None
for path in sys.argv[2:]:
    data = json.load(open(path))
    gpu = gpu or data.get("environment", {}).get("gpu") or ""
    for r in data["rows"]:
        if r.get("kernel") == "copy" and r.get("gbps") and copy is None:
            copy = r["gbps"]
        if str(r.get("provider", "")).startswith("gmp_ext") and r.get("status") != "ok":
            bad += 1
        if r.get("provider") not in KEY or r.get("model") not in targets:
            continue
        speed = r.get("speedup_vs_kthvalue") or r.get("speedup_vs_foreach_mul")
        fields = [f"{r.get('kernel', '')[:13]:13}", f"{r['provider'][:30]:30}",
                  f"{r.get('model', '')[:9]:9}", f"{r.get('dtype', '')[:8]:8}"]
        if r.get("status") == "ok":
            fields.append(f"{r['p50_ms']:9.2f} ms")
            fields.append(f"x{speed:6.2f}" if speed else " " * 7)
            rp = r.get("read_passes")
            fields.append(f"{rp:5.2f} reads" if rp else " " * 11)
            pct = r.get("pct_of_copy")
            fields.append(f"{pct:5.1f}% copy" if pct else "")
        else:
            fields.append(str(r.get("status"))[:40])
        lines.append("  ".join(fields).rstrip())
if copy:
    lines.insert(0, f"copy bandwidth (the first run's in-run reference): {copy:.0f} GB/s")
if lines:
    print(f"key rows, {' '.join(targets)}{' on ' + gpu if gpu else ''} (x: vs kthvalue or _foreach_mul_):")
    print("\n".join(lines))
if bad:
    print(f"{bad} gmp_ext rows not ok: see rows.txt")
EOF
}

summary() {
    {
        echo "gmp_ext GPU session: stage $stage, exit $status, ${SECONDS} s of ${STAGE_SECONDS}, DEVICE=$DEVICE, $(date -u +%Y-%m-%dT%H:%MZ)"
        [[ -n "$failure" ]] && echo "FAILED at $step: $failure"
        cat "$WORK/steps.txt" 2>/dev/null
        key_rows
    } >"$WORK/summary.txt"
    cp "$WORK/summary.txt" "$OUT/summary.txt"
    if find "$WORK/rows" -name "*.json" 2>/dev/null | grep -q .; then
        # shellcheck disable=SC2046
        timeout 60 "$PY" benchmarks/utils.py summarize $(find "$WORK/rows" -name "*.json" | LC_ALL=C sort) \
            >"$WORK/rows.txt" 2>&1
        cp "$WORK/rows.txt" "$OUT/rows.txt"
    fi
}

# Everything of $WORK in one archive: the device returns at most 8 files from $OUT.
pack() {
    tar -czf "$OUT/session.tar.gz" -C "$WORK" . 2>/dev/null || echo "packing $WORK failed"
}

finish() {
    summary
    pack
    log "done: stage $stage, exit $status, ${SECONDS} s; in $OUT: $(cd "$OUT" && echo summary.txt rows.txt session.tar.gz | xargs ls 2>/dev/null | xargs) (session.tar.gz: the logs and rows of $WORK)"
    cat "$OUT/summary.txt"
    exit "$status"
}

preflight
case "$stage" in
preflight) ;;
quick)
    gpu_summary
    build 150
    verify
    cuda_tests tests 45 "not slow" tests/test_cuda.py
    target_benchmarks quick
    require_gpu_rows
    ;;
session)
    gpu_summary
    build 180
    verify
    diagnostics
    cuda_tests tests "$TESTS_SECONDS" "not slow" tests/test_cuda.py tests/test_select.py \
        tests/test_bitmask.py tests/test_apply_masks.py tests/test_prune.py tests/test_nm.py \
        tests/test_library.py tests/test_plan.py tests/test_backend.py tests/test_scores.py \
        tests/test_scaled_keys.py
    target_benchmarks
    require_gpu_rows
    ;;
build-test | all)
    gpu_summary
    build 420
    verify
    diagnostics
    cuda_tests tests 330 "not slow" tests/
    cuda_tests tests-slow 150 slow tests/test_cuda.py
    if [[ "$stage" == all ]]; then
        target_benchmarks
        # shellcheck disable=SC2086
        bench_step semi-structured 60 7-semi "$PY" benchmarks/bench_semi_structured.py $BENCH_ARGS
        require_gpu_rows
    fi
    ;;
bench)
    gpu_summary
    build 420
    verify
    # shellcheck disable=SC2086
    apply_rows apply 150 2-apply "bfloat16 float32" $MODELS
    # shellcheck disable=SC2086
    select_rows select-fp32 420 3-select-fp32 float32 $MODELS
    bench_step copy 60 6-copy "$PY" benchmarks/bench_copy.py --device "$DEVICE"
    require_gpu_rows
    ;;
bench-bf16)
    gpu_summary
    build 420
    verify
    # shellcheck disable=SC2086
    select_rows select-bf16 420 1-select-bf16 bfloat16 $MODELS
    # shellcheck disable=SC2086
    bench_step semi-structured 60 7-semi "$PY" benchmarks/bench_semi_structured.py $BENCH_ARGS
    require_gpu_rows
    ;;
esac
finish
