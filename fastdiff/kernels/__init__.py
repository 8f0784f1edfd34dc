"""Triton kernels (imported lazily: Triton is optional)."""
