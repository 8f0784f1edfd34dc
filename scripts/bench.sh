#!/usr/bin/env bash
# The main job: set up (scripts/setup.sh) and print the fastdiff vs eager vs
# torch.compile table for this device.  Extra arguments go to
# `python -m fastdiff bench` (e.g. --full, --device cuda, --dtype fp16).
# The full pytest-benchmark suite and benchmarks/RESULTS.md:
#   python benchmarks/make_results.py
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m fastdiff bench "$@"
