"""Matmul lab: the hand-written kernels, kept for study and as benchmark baselines (see
kernels/lab/__init__.py). The reference, the variant that runs ("cpu": BLAS threaded by Numba),
the cuBLAS GPU path and the version log are in kernels/matmul.py.

- "cpu_numba": a hand-written blocked Numba kernel. Row blocks of a (MB rows) are the parallel
  unit, so each thread owns its rows of c; inside, a K-block of a's row times a contiguous
  row-segment of b accumulates into c's row-segment, the innermost loop runs over contiguous j
  and vectorises (no horizontal reductions). v1-v4 of the log: 100-136 GFLOP/s against ~195 for
  OpenBLAS; the gap (register tiling, packing, 512-bit vectors) is the lesson.
- "gpu_numba": the textbook shared-memory tiled numba.cuda kernel (TILE x TILE tiles of a and
  b staged in shared memory, one output element per thread); tested under the simulator. Its
  shared tiles are float64 whatever the input dtype (one kernel for both).

Leaves out: batched matmul (the BLAS path handles any shapes np.matmul does).
References: Goto & van de Geijn 2008 "Anatomy of high-performance matrix multiplication";
CUDA C Programming Guide, "Shared Memory" matrix multiplication example.

``VARIANTS`` is the family's whole table (kernels.matmul's extended by these two);
``python -m kernels.lab.matmul`` checks every one against the reference and times it.
"""
from __future__ import annotations

import numpy as np
from numba import float64, njit, prange

from kernels import matmul as _family
from kernels._common import FASTMATH, array_module, load_cuda, main_check

cuda = None  # numba.cuda, bound on first GPU use by load_cuda (see kernels/_common.py)

# ---------------------------------------------------------------------------------------------
# Numba CPU (study kernel)

@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _mm_block(a, b, c, i0, i1, k0, k1, j0, j1):  # c[i0:i1, j0:j1] += a[i0:i1, k0:k1] @ b[k0:k1, j0:j1]
    # 1-D slice views and a loop from 0: written as c[i, j] with j in range(j0, j1) the same
    # loop stayed scalar (4.0 GFLOP/s on one 256x384x1536 block vs 34 GFLOP/s this way).
    # Unrolled 4 rows of c x 4 rows of b (v4): each pass over j loads 4 segments of b and loads
    # and stores 4 of c for 16 multiply-adds, where one row x one k did 1 for 1 (the store of c
    # was the limit); the leftover rows and k run the plain loop.
    n = j1 - j0
    i = i0
    while i + 4 <= i1:
        c0, c1, c2, c3 = c[i, j0:j1], c[i + 1, j0:j1], c[i + 2, j0:j1], c[i + 3, j0:j1]
        k = k0
        while k + 4 <= k1:
            b0, b1, b2, b3 = b[k, j0:j1], b[k + 1, j0:j1], b[k + 2, j0:j1], b[k + 3, j0:j1]
            a00, a01, a02, a03 = a[i, k], a[i, k + 1], a[i, k + 2], a[i, k + 3]
            a10, a11, a12, a13 = a[i + 1, k], a[i + 1, k + 1], a[i + 1, k + 2], a[i + 1, k + 3]
            a20, a21, a22, a23 = a[i + 2, k], a[i + 2, k + 1], a[i + 2, k + 2], a[i + 2, k + 3]
            a30, a31, a32, a33 = a[i + 3, k], a[i + 3, k + 1], a[i + 3, k + 2], a[i + 3, k + 3]
            for j in range(n):
                x0, x1, x2, x3 = b0[j], b1[j], b2[j], b3[j]
                c0[j] += a00 * x0 + a01 * x1 + a02 * x2 + a03 * x3
                c1[j] += a10 * x0 + a11 * x1 + a12 * x2 + a13 * x3
                c2[j] += a20 * x0 + a21 * x1 + a22 * x2 + a23 * x3
                c3[j] += a30 * x0 + a31 * x1 + a32 * x2 + a33 * x3
            k += 4
        for kk in range(k, k1):
            _mm_rows(a, b, c, i, i + 4, kk, j0, j1)
        i += 4
    for kk in range(k0, k1):
        _mm_rows(a, b, c, i, i1, kk, j0, j1)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _mm_rows(a, b, c, i0, i1, k, j0, j1):  # c[i0:i1, j0:j1] += a[i0:i1, k] outer b[k, j0:j1]
    brow = b[k, j0:j1]
    for i in range(i0, i1):
        crow = c[i, j0:j1]
        aik = a[i, k]
        for j in range(brow.size):
            crow[j] += aik * brow[j]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _matmul_cpu_numba(a, b, c, MB, KB, NB):  # (M,K), (K,N), (M,N); block sizes as arguments
    # The block loop is a separate function: the same loops written inline in this prange body
    # stayed scalar (515 ms at 2048x384x1536 vs 12.7 ms BLAS), as in kernels/gradnorm.py.
    M, K = a.shape
    N = b.shape[1]
    for bi in prange((M + MB - 1) // MB):
        i0 = bi * MB
        i1 = min(M, i0 + MB)
        c[i0:i1, :] = 0
        for k0 in range(0, K, KB):  # a KB x NB block of b stays in L2 across the MB rows
            for j0 in range(0, N, NB):
                _mm_block(a, b, c, i0, i1, k0, min(K, k0 + KB), j0, min(N, j0 + NB))


def matmul_cpu_numba(a, b):
    c = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
    _matmul_cpu_numba(np.ascontiguousarray(a), np.ascontiguousarray(b), c, 64, 64, 768)  # v4 log
    return c


# ---------------------------------------------------------------------------------------------
# GPU (study kernel; the GPU path itself is cuBLAS, kernels/matmul.py)

TILE = 16


def _matmul_gpu_kernel(a, b, c):  # (M,K), (K,N), (M,N)
    sa = cuda.shared.array((TILE, TILE), dtype=float64)
    sb = cuda.shared.array((TILE, TILE), dtype=float64)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    row = cuda.blockIdx.y * TILE + ty
    col = cuda.blockIdx.x * TILE + tx
    M, K = a.shape
    N = b.shape[1]
    acc = 0.0
    for k0 in range(0, K, TILE):
        # stage one tile of a and b; out-of-range entries are 0 so they add nothing
        sa[ty, tx] = a[row, k0 + tx] if (row < M and k0 + tx < K) else 0.0
        sb[ty, tx] = b[k0 + ty, col] if (k0 + ty < K and col < N) else 0.0
        cuda.syncthreads()
        for kk in range(TILE):
            acc += sa[ty, kk] * sb[kk, tx]
        cuda.syncthreads()  # the tile is fully read before the next one overwrites it
    if row < M and col < N:
        c[row, col] = acc


_GPU = {}


def _gpu():
    if not _GPU:
        cu = load_cuda(globals())
        _GPU["mm"] = cu.jit(_matmul_gpu_kernel)
    return _GPU


def matmul_gpu_numba(a, b):
    xp = array_module(a)
    M, N = a.shape[0], b.shape[1]
    c = xp.empty((M, N), dtype=a.dtype)
    grid = (max(1, (N + TILE - 1) // TILE), max(1, (M + TILE - 1) // TILE))
    _gpu()["mm"][grid, (TILE, TILE)](xp.ascontiguousarray(a), xp.ascontiguousarray(b), c)
    return c

def gpu_kernels_for_ptx():
    """(name, python function, float32 signature) of each GPU kernel of the family, for
    compile_ptx checks: kernels.matmul has none of its own (its GPU path is cuBLAS)."""
    from numba import float32, void
    load_cuda(globals())
    m = float32[:, ::1]
    return _family.gpu_kernels_for_ptx() + [("matmul_gpu_numba", _matmul_gpu_kernel, void(m, m, m))]


# ---------------------------------------------------------------------------------------------
# The family's whole table: the reference, the lab's variants, then kernels.matmul's

_LAB = {"matmul": {"cpu_numba": matmul_cpu_numba, "gpu_numba": matmul_gpu_numba}, "matmul_acc": {}}
VARIANTS = {op: {"ref": table["ref"], **_LAB[op], **table} for op, table in _family.VARIANTS.items()}


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    a_ = rng.standard_normal((2048, 384)).astype(np.float32)  # B*T x C
    b_ = rng.standard_normal((384, 1536)).astype(np.float32)  # C x 4C (MLP up-projection)
    main_check({"matmul": VARIANTS["matmul"]},
               {"matmul": (lambda xp: (xp.asarray(a_), xp.asarray(b_)), ())})
