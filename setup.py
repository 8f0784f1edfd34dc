"""Builds the C++/CUDA extension ``fastdiff._C`` (metadata lives in pyproject.toml).

Install torch first, then ``pip install --no-build-isolation -e .`` so that the
extension is compiled against the installed torch.  The CUDA kernels are built
when torch is a CUDA build and nvcc is found (CUDA_HOME); FASTDIFF_BUILD_CUDA=0
or 1 overrides that.  TORCH_CUDA_ARCH_LIST picks the GPU architectures as for
any torch extension (default here: sm_80 and sm_90 code plus compute_90 PTX).
"""

import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# Every csrc/*.cpp (bindings and CPU kernels) and csrc/*.cu (CUDA kernels), in
# sorted order so the build is the same on every machine; a new op adds its
# files and touches neither this list nor CMakeLists.txt.  Paths are relative
# to the repository root, where pip runs setup.py.
CPU_SOURCES = sorted(glob.glob("csrc/*.cpp"))
CUDA_SOURCES = sorted(glob.glob("csrc/*.cu"))
DEFAULT_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=[sm_90,compute_90]",
]


def build_cuda() -> bool:
    env = os.environ.get("FASTDIFF_BUILD_CUDA", "").strip()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if env == "":
        return available
    if env not in ("0", "1"):
        raise RuntimeError(f"FASTDIFF_BUILD_CUDA must be 0 or 1, got {env!r}")
    if env == "1" and not available:
        raise RuntimeError(
            "FASTDIFF_BUILD_CUDA=1 needs a CUDA build of torch (torch.version.cuda is "
            f"{torch.version.cuda}) and nvcc (CUDA_HOME is {CUDA_HOME})"
        )
    return env == "1"


def openmp_flags() -> list[str]:
    """Compile flags that make at::parallel_for parallel.

    With torch's OpenMP backend, at::parallel_for is an inline template that
    only runs in parallel when the extension itself is compiled with OpenMP;
    without the flag it silently runs on one thread.  Only the compile step
    gets the flag: the GOMP symbols then resolve to the OpenMP runtime torch
    already loaded (libtorch_cpu depends on it), so there is one thread pool
    and torch.set_num_threads() governs it.  The native backend needs nothing.
    On Windows (MSVC's own OpenMP runtime would be a second pool) the loop
    stays serial.
    """
    openmp_backend = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    if sys.platform == "win32" or not openmp_backend:
        return []
    return ["-fopenmp"]


def extension():
    # -ffp-contract=off: no FMA contraction, so the CPU kernel rounds exactly as
    # the plain-torch reference does on every architecture.  -fno-trapping-math
    # (values unchanged) lets GCC vectorise the branchy fp16 <-> fp32 conversions.
    cxx = ["/O2"] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
    cxx += openmp_flags()
    if not build_cuda():
        return CppExtension("fastdiff._C", CPU_SOURCES, extra_compile_args={"cxx": cxx})
    # torch adds its usual nvcc flags (--expt-relaxed-constexpr, -D__CUDA_NO_HALF_*).
    nvcc = ["-O3", "-DFASTDIFF_WITH_CUDA"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc += DEFAULT_GENCODE
    return CUDAExtension(
        "fastdiff._C",
        CPU_SOURCES + CUDA_SOURCES,
        extra_compile_args={"cxx": cxx + ["-DFASTDIFF_WITH_CUDA"], "nvcc": nvcc},
    )


setup(
    packages=find_packages(include=["fastdiff", "fastdiff.*"]),
    package_data={"fastdiff": ["assets/*.pt"]},  # the digits demo's weights
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
