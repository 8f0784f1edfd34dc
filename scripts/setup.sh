#!/usr/bin/env bash
# Install fastdiff and what it needs on a fresh machine (Python, gcc; nvcc optional).
#
# torch is installed FIRST and pinned: a pip that resolves torch on its own pulls
# a multi-GB CUDA build.  fastdiff is then built with --no-build-isolation so the
# C++ extension compiles against that same, already installed torch (an isolated
# build would download another torch into a temporary environment and the
# extension's ABI would not match the torch you run).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_SPEC=${FASTDIFF_TORCH:-torch==2.13.0}

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "$TORCH_SPEC"
fi
"$PY" -m pip install -q ninja pybind11 numpy setuptools wheel tqdm
# Optional pieces: Triton (its interpreter runs the Triton kernels' tests on CPU),
# test and benchmark tools, diffusers for the parity tests, cmake for the C++ build check,
# scikit-learn for the digits data of `python -m fastdiff train`.
"$PY" -m pip install -q triton pytest pytest-benchmark scipy diffusers cmake scikit-learn einops
# denoising-diffusion-pytorch's own U-Net for tests/test_ddpm_package.py, without its
# dependencies: they include torchvision (whose resolution would replace the CPU torch);
# the test loads only the U-Net's module and stubs the Trainer-only imports.
"$PY" -m pip install -q --no-deps denoising-diffusion-pytorch==2.3.4 ema-pytorch
# and release 1.11.1 (GroupNorm blocks) beside it, in a folder of its own: the same test
# loads its U-Net module from there.
DDPM_1X=.cache/ddpm-1.11.1
if [ ! -f "$DDPM_1X/denoising_diffusion_pytorch/denoising_diffusion_pytorch.py" ]; then
    "$PY" -m pip install -q --no-deps --target "$DDPM_1X" denoising-diffusion-pytorch==1.11.1
fi
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c "import fastdiff; print('fastdiff', fastdiff.__version__, 'backends:', fastdiff.backends())"
