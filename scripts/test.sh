#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite.  On a machine without a
# GPU the Triton kernels run in interpreter mode (tests/conftest.py sets
# TRITON_INTERPRET=1) and GPU-only tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/cmake_check.sh
PY=${PYTHON:-python3}
"$PY" -m pytest tests -q -ra "$@"
