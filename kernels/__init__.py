"""Kernels: array in, array out, no autograd.

One file per op family. Each holds, in this order: a docstring with the math, the shape legend
and a version log; the NumPy reference ``<op>_ref``; the Numba CPU kernel; the GPU kernel
(``numba.cuda``, launched on CuPy arrays); the registration; and a ``__main__`` that checks every
variant against the reference and times it.

Dispatch: ``kernels.get(op, *arrays)`` picks the backend from the array type (CuPy -> "gpu",
NumPy -> "cpu"); ``TINYLM_KERNELS=ref`` forces the NumPy references everywhere.
"""
# Threads, and why no OMP_WAIT_POLICY is set here any more: Numba's OpenMP workers spin for a
# moment after each parallel kernel (libgomp's default), and so do OpenBLAS's own threads after
# each GEMM, for longer. When tinylm's GEMMs ran on OpenBLAS's pool, each pool's spinning took a
# core from the other on 2-core machines, and OMP_WAIT_POLICY=PASSIVE was the fix then. Now every
# tinylm GEMM runs inside Numba's threads as single-threaded BLAS calls (kernels/matmul.py, "cpu";
# attention's "cpu_gemm"), OpenBLAS's pool is held at one thread (kernels/_threads.py), and
# passive waiting only added its wake-up
# latency (0.1-0.4 ms per parallel kernel) to every op: measured at config S (2 cores), 128 ->
# 118 ms per training step and KV-cache generation at M 84 -> 122 tokens/s with libgomp's default.
from kernels.registry import available, backend_of, get, register

__all__ = ["available", "backend_of", "get", "register"]
