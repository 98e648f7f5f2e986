"""Matrix product c = a @ b. BLAS (np.matmul / cuBLAS via CuPy) is the default everywhere.

Shapes: a (M, K), b (K, N), c (M, N).

Two ops: ``matmul(a, b) -> c`` and ``matmul_acc(a, b, c)``: c += a @ b in place (GEMM with
beta = 1). The second is how a Linear's weight gradient lands straight in the optimizer's
gradient buffer (tinylm.tensor, "gradient sinks") with no (C_in, C_out) temporary.

Variants:
- "ref": ``np.matmul`` (OpenBLAS here, threaded by OpenBLAS).
- "cpu": the same BLAS GEMM threaded by Numba: one block of C per thread, each a
  single-threaded GEMM call (why: the section "cpu" below). The registered default on the CPU;
  ``tinylm.functional.linear`` and ``tinylm.ops.matmul`` call it. Falls back to ``np.matmul``
  for what it does not cover (batched or non-BLAS strides, integer dtypes, BLAS other than
  OpenBLAS).
- "gpu": ``cupy.matmul`` (cuBLAS): registered on the GPU.
- In the lab (kernels/lab/matmul.py, study kernels and benchmark baselines, each still checked
  against the reference and benchmarked): "cpu_numba", a hand-written blocked Numba kernel
  (v1-v4 below), and "gpu_numba", the textbook shared-memory tiled numba.cuda kernel.

Leaves out: batched matmul in the hand-written kernels (the BLAS path handles any shapes
np.matmul does), register tiling/packing (the gap to BLAS is the lesson: the lab).
References: Goto & van de Geijn 2008 "Anatomy of high-performance matrix multiplication";
CUDA C Programming Guide, "Shared Memory" matrix multiplication example.

Version log (python -m kernels.matmul, cpu_numba: python -m kernels.lab.matmul; (2048, 384) @
(384, 1536) float32, 2 threads):
  BLAS (OpenBLAS) 12.7 ms (190 GFLOP/s).
  cpu_numba v1: loops inline in the prange body: 515 ms (scalar).
  cpu_numba v2: block loops in a helper, c[i, j] indexing with j in range(j0, j1): 342 ms.
  cpu_numba v3: 1-D row slices, inner loop from 0: 100 ms (24 GFLOP/s), 34 GFLOP/s on one
     core for one 256x384x1536 block. The remaining 4-8x is register blocking and packing.
  cpu_numba v4: 4 rows of c x 4 k per pass over j (see _mm_block): 100-120 GFLOP/s in
     generated-variant trials (2x4, 4x4, 6x4, 8x4, 4x8, 8x2 rows x k; 4x4 and 8x4 best, 2x8
     and 8x2 worst), against 195 for OpenBLAS in the same runs. Blocks (MB, KB, NB) swept:
     (64, 64, 768) 116-136 GFLOP/s, (32, 128, 512) 133, (64, 256, 256) 116; BLAS 197-201.
     Also tried: a 4x4 tile of dot products over k against a packed b^T (16 scalar reductions
     for LLVM to keep in vector registers): 28-35 GFLOP/s (with another job on the cores). What is left: accumulators that
     stay in registers across k (Numba has no small stack arrays for LLVM to promote) and
     512-bit vectors (LLVM prefers 256-bit on this CPU), with packing of a and b.
  cpu v2 (was np.matmul): GEMM threaded by Numba, OpenBLAS single-threaded per block. Same speed
     as OpenBLAS's own threading at the M shapes ((2048,384)@(384,1536): 12.2 vs 12.5 ms; the
     transposed dW product 13.3 vs 12.9), but it ends the two-pool contention: in one config M
     training step attention went 11/22 -> 6.5/12.5 ms (fwd/bwd) per layer. At config S
     shapes the split GEMMs ran 0.36-0.51 ms for (2048,128)@(128,128) with OMP_WAIT_POLICY=
     PASSIVE (the old default) and 0.36-0.40 ms with libgomp's default spin; PASSIVE dropped.
     One-row products: GEMM per column block 469 us for (1,384)@(384,8192), GEMV 115 us,
     np.matmul 96 us; with np.matmul (OpenBLAS-threaded) for the one-row products, KV-cache
     generation at M took 7.9 tokens/s, with the GEMV here 175-184.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from kernels._blas import blas_single_threaded, gemm_for, gemv_for
from kernels._common import array_module, main_check
from kernels.registry import register


@register("matmul", "ref")
def matmul_ref(a, b):  # (M,K), (K,N) -> (M,N)
    return array_module(a).matmul(a, b)


# ---------------------------------------------------------------------------------------------
# Numba CPU + BLAS, "cpu" (the default): the same OpenBLAS GEMM, but threaded by Numba. C is cut
# into one block of rows (or of columns, when it is wider than tall) per Numba thread, and each
# thread calls single-threaded GEMM on its block (kernels/_blas.py). A one-row product (KV-cache
# decoding) is a GEMV instead, split over threads by columns from GEMV_COLS_PER_THREAD columns
# up: GEMM would pack the whole weight matrix for one row. Why not let OpenBLAS thread it:
# after each call OpenBLAS's workers spin for a while (OPENBLAS_THREAD_TIMEOUT, fixed when
# NumPy loads the library), and the Numba kernel that follows a GEMM in a model (attention,
# GELU, layernorm) then shares its cores with a spinning thread: attention ran 1.7-2x slower
# right after a GEMM than alone, and generation fell to 7.9 tokens/s from 178 (v2 in the log).
# tinylm keeps OpenBLAS's own pool at one thread (kernels/_threads.py).

@njit(cache=True, parallel=True)
def _gemm_split(gemm, ta, tb, M, N, K, one, zero, A, lda, B, ldb, C, ldc, isz, nchunk, by_rows):
    for c in prange(nchunk):
        if by_rows:  # rows i0:i1 of C need rows i0:i1 of op(A)
            i0, i1 = M * c // nchunk, M * (c + 1) // nchunk
            aoff = (i0 * lda if ta == 111 else i0) * isz
            gemm(101, ta, tb, i1 - i0, N, K, one, A + aoff, lda, B, ldb, zero, C + i0 * ldc * isz, ldc)
        else:  # columns j0:j1 of C need columns j0:j1 of op(B)
            j0, j1 = N * c // nchunk, N * (c + 1) // nchunk
            boff = (j0 if tb == 111 else j0 * ldb) * isz
            gemm(101, ta, tb, M, j1 - j0, K, one, A, lda, B + boff, ldb, zero, C + j0 * isz, ldc)


@njit(cache=True, parallel=True)
def _gemv_split(gemv, tb, N, K, one, beta, X, incx, B, ldb, Y, isz, nchunk):
    # y (1, N) = x (1, K) @ op(B) (K, N), one block of y's columns per thread:
    # op(B) = B (K rows of ldb): y = B^T x;  op(B) = B^T (N rows of ldb): y = B x
    for c in prange(nchunk):
        j0, j1 = N * c // nchunk, N * (c + 1) // nchunk
        if tb == 111:
            gemv(101, 112, K, j1 - j0, one, B + j0 * isz, ldb, X, incx, beta, Y + j0 * isz, 1)
        else:
            gemv(101, 111, j1 - j0, K, one, B + j0 * ldb * isz, ldb, X, incx, beta, Y + j0 * isz, 1)


def _blas_layout(x):
    """(CBLAS transpose flag, leading dimension) of a 2-D array read row-major, or None."""
    isz = x.itemsize
    r, c = x.shape
    s0, s1 = x.strides
    if (s1 == isz or c == 1) and s0 % isz == 0 and s0 // isz >= max(1, c):
        return 111, s0 // isz  # rows contiguous: as is
    if (s0 == isz or r == 1) and s1 % isz == 0 and s1 // isz >= max(1, r):
        return 112, s1 // isz  # columns contiguous: the transpose of a row-major array
    return None


GEMV_COLS_PER_THREAD = 2048  # one-row products split over threads only from this many columns


def _gemm_into(a, b, c, beta) -> bool:
    """c = a @ b + beta c through _gemm_split; False (c untouched) where it does not apply."""
    gemm = gemm_for(a.dtype) if a.dtype == b.dtype == c.dtype and a.ndim == b.ndim == 2 else None
    if gemm is None:
        return False
    la, lb, lc = _blas_layout(a), _blas_layout(b), _blas_layout(c)
    M, K = a.shape
    N = b.shape[1]
    if (la is None or lb is None or lc is None or lc[0] != 111 or 0 in (M, N, K)
            or not (a.flags.aligned and b.flags.aligned and c.flags.aligned and c.flags.writeable)):
        return False  # other dtypes, strides or BLAS vendors: the caller uses NumPy's own path
    if M == 1 and (gemv := gemv_for(a.dtype)) is not None:  # one row: GEMV, no packing
        incx = 1 if la[0] == 111 else la[1]
        nchunk = max(1, min(get_num_threads(), N // GEMV_COLS_PER_THREAD))
        with blas_single_threaded():
            if nchunk == 1:  # a direct call: a Numba launch costs more than the product
                if lb[0] == 111:
                    gemv(101, 112, K, N, 1.0, b.ctypes.data, lb[1], a.ctypes.data, incx, beta, c.ctypes.data, 1)
                else:
                    gemv(101, 111, N, K, 1.0, b.ctypes.data, lb[1], a.ctypes.data, incx, beta, c.ctypes.data, 1)
            else:
                _gemv_split(gemv, lb[0], N, K, a.dtype.type(1), a.dtype.type(beta), a.ctypes.data,
                            incx, b.ctypes.data, lb[1], c.ctypes.data, a.itemsize, nchunk)
        return True
    by_rows = M >= N
    nchunk = max(1, min(get_num_threads(), M if by_rows else N))
    with blas_single_threaded():
        _gemm_split(gemm, la[0], lb[0], M, N, K, a.dtype.type(1), a.dtype.type(beta),
                    a.ctypes.data, la[1], b.ctypes.data, lb[1], c.ctypes.data, lc[1], a.itemsize,
                    nchunk, by_rows)
    return True


def matmul_cpu(a, b):  # (M,K), (K,N) -> (M,N)
    if a.ndim == b.ndim == 2 and a.dtype == b.dtype:
        c = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        if _gemm_into(a, b, c, 0):
            return c
    return np.matmul(a, b)


@register("matmul_acc", "ref")
def matmul_acc_ref(a, b, c):  # c (M,N) += a (M,K) @ b (K,N), in place
    c += a @ b


@register("matmul_acc", "cpu")
def matmul_acc_cpu(a, b, c):
    if not _gemm_into(a, b, c, 1):
        c += np.matmul(a, b)


register("matmul", "cpu")(matmul_cpu)
register("matmul_acc", "gpu")(matmul_acc_ref)  # cuBLAS product, then one add


# ---------------------------------------------------------------------------------------------
# GPU

@register("matmul", "gpu")
def matmul_gpu(a, b):
    return array_module(a).matmul(a, b)  # cuBLAS


def gpu_kernels_for_ptx():
    """(name, python function, float32 signature) of each GPU kernel, for compile_ptx checks:
    none here (the GPU path is cuBLAS); the hand-written one is kernels/lab/matmul.py's."""
    return []


VARIANTS = {"matmul": {"ref": matmul_ref, "cpu": matmul_cpu, "gpu": matmul_gpu},
            "matmul_acc": {"ref": matmul_acc_ref, "cpu": matmul_acc_cpu, "gpu": matmul_acc_ref}}


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    a_ = rng.standard_normal((2048, 384)).astype(np.float32)  # B*T x C
    b_ = rng.standard_normal((384, 1536)).astype(np.float32)  # C x 4C (MLP up-projection)
    c_ = rng.standard_normal((2048, 1536)).astype(np.float32)
    main_check(VARIANTS, {"matmul": (lambda xp: (xp.asarray(a_), xp.asarray(b_)), ()),
                          "matmul_acc": (lambda xp: (xp.asarray(a_), xp.asarray(b_), xp.array(c_)), (2,))})
