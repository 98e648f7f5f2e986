"""Kernels: array in, array out, no autograd.

One file per op family. Each holds, in this order: a docstring with the math, the shape legend
and a version log; the NumPy reference ``<op>_ref``; the Numba CPU kernel; the GPU kernel
(``numba.cuda``, launched on CuPy arrays); the registration; and a ``__main__`` that checks every
variant against the reference and times it.

Dispatch: ``kernels.get(op, *arrays)`` picks the backend from the array type (CuPy -> "gpu",
NumPy -> "cpu"); ``TINYLM_KERNELS=ref`` forces the NumPy references everywhere.

Number formats (mixed precision, tinylm/amp/). One policy for every family, CPU and GPU:
- A 16-bit array is bf16 stored as ``uint16`` (the top half of a float32; in kernels/ a uint16
  float argument always means bf16, integer ids are int64) or fp16 stored as ``float16``.
  Conversion: kernels/_formats.py (round to nearest even, NaN -> quiet NaN, infinities and
  subnormals as IEEE; bit-exact against ml_dtypes).
- Every kernel accepts them (kernels/_lowp.py): 16-bit arguments are converted to float32 on
  entry, the fp32 kernel runs, activations are stored back in the input's format, statistics
  (mean, rstd, lse, per-row losses, norms) stay fp32.
- Accumulation is in fp32 or wider, never in a 16-bit format: fp32 inputs accumulate as they
  always have (fp32 on the CPU; the gradient norm and the GPU row sums in float64), float64
  inputs (gradient checks) in float64. NumPy has no float16 GEMM (2048x384 @ 384x1536: 4.4 s
  against 37 ms in fp32, docs/performance.md), so on the CPU 16-bit is a storage format and
  matmul converts to fp32 and calls the same BLAS; on a GPU an fp16 matmul is cuBLAS in fp16
  with fp32 accumulation.
- The engine (tinylm/tensor.py, ``autocast``) keeps a 16-bit run's activations and working
  weights in these formats and hands the kernels float32 it decoded, except where a kernel
  reads the format itself (the fused head decodes its weight block by block, head_ce.py);
  tinylm/amp/policy.py says what a 16-bit run stores where.
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
