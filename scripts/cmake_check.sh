#!/usr/bin/env bash
# Build fastdiff._C once more with CMake (the C++ developers' build) and run the
# extension's tests against that module, so CMakeLists.txt cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
prefix="$("$PY" -c 'import torch;print(torch.utils.cmake_prefix_path)');$("$PY" -c 'import pybind11;print(pybind11.get_cmake_dir())')"
cmake -S . -B build/cmake -DPython_EXECUTABLE="$(command -v "$PY")" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build build/cmake -j"$(nproc)"
# A copy of the package with the CMake-built module, outside the source tree
# (which the current directory would otherwise put first on sys.path).
rm -rf build/cmake/pkg && mkdir -p build/cmake/pkg
cp -r fastdiff build/cmake/pkg/
rm -f build/cmake/pkg/fastdiff/_C*.so
cp build/cmake/_C*.so build/cmake/pkg/fastdiff/
# -rf: a failure is named in CI's log (the summary alone would not say which test)
(cd build/cmake/pkg && "$PY" -m pytest -q -rf -p no:cacheprovider ../../../tests/test_extension.py \
    | grep -E "^(FAILED|ERROR)|passed|failed" | sed 's/^/cmake build: test_extension.py /')
