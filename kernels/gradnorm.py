"""Sum of squares of a flat array, accumulated in float64 (for the global gradient norm).

Math: sumsq(x) = sum_i x_i^2; the global norm is sqrt(sum over parameter groups of sumsq).
Shapes: x (N,).

CPU: 64 fixed chunks (not one per thread, so the result does not depend on the thread count),
each summed in float64, then the 64 partials summed in order.

Leaves out: the sqrt and the clipping (the optimizer does both).
References: torch.nn.utils.clip_grad_norm_.

Version log (python -m kernels.gradnorm: 13.9M float32, 2 threads, medians):
  v1 loop written inline in the prange body: stayed scalar, 7.8 ms (15.0 ms on 1 thread).
  v2 the loop in a separate @njit function called on a slice: vectorised, 1.27 ms vs ref
     18.5 ms (15x); PyTorch's grad norm 7.8 ms (docs/performance.md, "PyTorch reference points").
"""
from __future__ import annotations

import numpy as np

from numba import float64, njit, prange

from kernels._common import FASTMATH, array_module, load_cuda, main_check
from kernels.registry import register

cuda = None  # numba.cuda, bound on first GPU use by load_cuda (see kernels/_common.py)


@register("sumsq", "ref")
def sumsq_ref(x):  # (N,) -> float
    xp = array_module(x)
    x64 = x.astype(xp.float64, copy=False)
    return float(xp.dot(x64, x64))



# ---------------------------------------------------------------------------------------------
# Numba CPU

@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _sumsq_span(x):  # (n,) -> float64
    acc = 0.0
    for i in range(x.size):
        xi = np.float64(x[i])
        acc += xi * xi
    return acc


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _sumsq_cpu(x, parts):  # (n,), (P,) float64
    # The loop lives in _sumsq_span: written inline in this prange body it stayed scalar
    # (15.0 ms on 13.9M float32, 1 thread); called on a slice it vectorises (1.9 ms).
    n = x.size
    P = parts.size
    for q in prange(P):
        parts[q] = _sumsq_span(x[q * n // P:(q + 1) * n // P])


@register("sumsq", "cpu")
def sumsq_cpu(x):
    parts = np.empty(64, dtype=np.float64)
    _sumsq_cpu(x.ravel(), parts)
    return float(parts.sum())


# ---------------------------------------------------------------------------------------------
# GPU: each block reduces a grid-stride slice in float64 shared memory to one partial; the
# partials (<= 1024) are summed by the array module.

SQ_THREADS = 256


def _sumsq_gpu_kernel(x, parts):  # (n,), (blocks,) float64
    tid = cuda.threadIdx.x
    buf = cuda.shared.array(SQ_THREADS, dtype=float64)
    acc = 0.0
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        xi = float64(x[i])
        acc += xi * xi
    buf[tid] = acc
    cuda.syncthreads()
    stride = SQ_THREADS // 2
    while stride > 0:
        if tid < stride:
            buf[tid] += buf[tid + stride]
        cuda.syncthreads()
        stride //= 2
    if tid == 0:
        parts[cuda.blockIdx.x] = buf[0]


_GPU = {}


def _gpu():
    if not _GPU:
        cu = load_cuda(globals())
        _GPU["sumsq"] = cu.jit(_sumsq_gpu_kernel)
    return _GPU


@register("sumsq", "gpu")
def sumsq_gpu(x):
    xp = array_module(x)
    blocks = max(1, min(1024, (x.size + SQ_THREADS - 1) // SQ_THREADS))
    parts = xp.empty(blocks, dtype=xp.float64)
    _gpu()["sumsq"][blocks, SQ_THREADS](x.ravel(), parts)
    return float(parts.sum())


def gpu_kernels_for_ptx():
    """(name, python function, float32 signature) of each GPU kernel, for compile_ptx checks."""
    from numba import float32, void
    load_cuda(globals())
    return [("sumsq", _sumsq_gpu_kernel, void(float32[::1], float64[::1]))]


VARIANTS = {"sumsq": {"ref": sumsq_ref, "cpu": sumsq_cpu, "gpu": sumsq_gpu}}


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    g_ = (1e-3 * rng.standard_normal(13_900_000)).astype(np.float32)
    main_check(VARIANTS, {"sumsq": (lambda xp: (xp.asarray(g_),), ())})
