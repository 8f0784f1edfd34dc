"""Benchmarks: `pytest benchmarks --benchmark-only` (CPU cases always, GPU cases with CUDA).

`python benchmarks/make_results.py` runs them and rewrites benchmarks/RESULTS.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
