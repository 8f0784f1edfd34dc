#!/usr/bin/env bash
# Set up (scripts/setup.sh), run the benchmarks and rewrite benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" benchmarks/make_results.py "$@"
cat benchmarks/RESULTS.md
