"""Benchmarks: `pytest benchmarks --benchmark-only` (CPU cases always, GPU cases with CUDA).

`python benchmarks/make_results.py` runs them and rewrites benchmarks/RESULTS.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the stack in the JSON, so a stored run says where it was measured."""
    import platform

    import torch

    import fastdiff

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine_info["fastdiff"] = {
        "torch": torch.__version__,
        "triton": triton_version,
        "fastdiff": fastdiff.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
    }
