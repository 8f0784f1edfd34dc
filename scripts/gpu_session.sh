#!/usr/bin/env bash
# One lent-GPU session in one command: build the CUDA extension in place, then run
# the named stages.  Usage (on the device machine, repo root):
#     bash scripts/gpu_session.sh build overhead profile tests sanitize probe bench
# Logs and results go to $OUT (the device tool's return folder) or /tmp/gpu_out.
# A prebuilt module for this Python/torch (fastdiff/_C.*.so) is reused when it imports.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

stage_build() {
    if python3 -c "import fastdiff._C as C, sys; sys.exit(0 if C.has_cuda() else 1)" 2>/dev/null; then
        echo "build: reusing $(ls fastdiff/_C*.so)"
    else
        local t0=$SECONDS
        # The device image's Python names /opt/gcc/bin/g++ as its compiler; a module it
        # linked (2026-11-23) had no libstdc++.so dependency and segfaulted inside
        # std::ostream::_M_insert<long> whenever a TORCH_CHECK message formatted a
        # number.  Build with the system g++ unless CXX says otherwise.
        env | grep -E "^(CC|CXX|LDSHARED|LDFLAGS|CFLAGS|CXXFLAGS)=" || true
        CC=${CC:-gcc} CXX=${CXX:-g++} LDSHARED=${LDSHARED:-g++ -shared} \
        TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FASTDIFF_BUILD_CUDA=1 \
            python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
        echo "build: $((SECONDS - t0)) s"
        ldd fastdiff/_C*.so | grep -q "libstdc++" \
            || echo "WARNING: fastdiff/_C has no libstdc++.so dependency (statically linked?)"
        grep -i "warning" "$OUT/build.log" | grep -v "^ninja" | sort -u | head -20
    fi
    cp fastdiff/_C*.so "$OUT/" 2>/dev/null
    python3 -c "import fastdiff; print('backends', fastdiff.backends())"
}

stage_tests() {
    local t0=$SECONDS
    timeout ${TESTS_TIMEOUT:-420} python3 -m pytest ${TESTS:-tests} -q -ra -n 8 --timeout 300 \
        -p no:cacheprovider >"$OUT/tests.log" 2>&1
    echo "tests: rc $? in $((SECONDS - t0)) s"
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-300 | head -60
    tail -3 "$OUT/tests.log"
}

# Where a direct call of fastdiff._C with bad arguments crashes instead of raising.
stage_probe() {
    g++ --version | head -1
    python3 -c "import torch; print('cxx11 abi', torch.compiled_with_cxx11_abi())"
    ldd fastdiff/_C*.so | grep -iE "stdc|gcc_s|omp|c10"
    python3 scripts/gpu_crash_probe.py; echo "probe rc $?"
    timeout 120 cuda-gdb -batch -ex run -ex bt --args python3 scripts/gpu_crash_probe.py \
        >"$OUT/probe.log" 2>&1
    grep -E "^#|signal|raised" "$OUT/probe.log" | cut -c1-220 | head -30
}

stage_sanitize() {
    local t0=$SECONDS
    for tool in memcheck racecheck; do
        timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 \
            python3 scripts/gpu_sanitize.py >"$OUT/sanitize_$tool.log" 2>&1
        echo "sanitize $tool: rc $?"; tail -4 "$OUT/sanitize_$tool.log"
    done
    echo "sanitize: $((SECONDS - t0)) s"
}

# Host cost per call on the GPU path (the first question of the 2026-11-23 notes).
stage_overhead() {
    timeout 300 python3 benchmarks/overhead.py --device cuda --profile >"$OUT/overhead.log" 2>&1
    echo "overhead: rc $?"; sed -n 1,16p "$OUT/overhead.log"
    # host cost per call of the e2e U-Nets at width 8 (eager / optimize / fastdiff.nn.UNet)
    timeout 300 python3 benchmarks/overhead.py --device cuda --models-only >"$OUT/overhead_models.log" 2>&1
    echo "overhead --models: rc $?"; cat "$OUT/overhead_models.log" | tail -12
}

# Kernel time vs wall time per training / sampling step of the e2e U-Net, by kernel name:
# which fused kernels are slower than eager's, and whether the GPU waits on the host.
stage_profile() {
    (cd benchmarks && timeout ${PROFILE_TIMEOUT:-300} python3 profile_e2e.py --device cuda \
        --batch ${PROFILE_BATCH:-64} --top 20) >"$OUT/profile.log" 2>&1
    echo "profile: rc $?"; grep -E "^==|^torch" "$OUT/profile.log"
}

# BENCH_GROUPS: ';'-separated pytest -k expressions, one make_results run each, so a
# group cut off by its timeout loses only itself; results are stored after each.
stage_bench() {
    local IFS=';'
    for k in ${BENCH_GROUPS:-not e2e}; do
        local t0=$SECONDS
        FASTDIFF_BENCH_DEVICES=cuda timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/make_results.py \
            -k "$k" >>"$OUT/bench.log" 2>&1
        echo "bench [$k]: rc $? in $((SECONDS - t0)) s"
        cp benchmarks/results/cuda.json benchmarks/RESULTS.md "$OUT/" 2>/dev/null
    done
    grep -E "passed|failed|Error" "$OUT/bench.log" | tail -8
}

for stage in "$@"; do "stage_$stage"; done
