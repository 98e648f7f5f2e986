"""BLAS GEMM callable from inside Numba kernels: ``gemm_for(dtype)`` and ``blas_single_threaded()``.

Why: a kernel that works head by head (attention: scores, softmax, then P V) wants its small
products done by a BLAS micro-kernel while the (T, T)-shaped tile of that head is still in L2,
not as one batched ``np.matmul`` over all heads whose tiles go out to memory and back between
the steps. Numba's ``np.dot`` needs SciPy for its BLAS; instead we take ``cblas_sgemm`` and
``cblas_dgemm`` from the OpenBLAS that NumPy already loaded (the same library
``kernels/_threads.py`` finds), as ctypes functions. A ctypes function passed as an *argument*
to an ``@njit(cache=True)`` kernel keeps it cacheable (Numba types it as an
``ExternalFunctionPointer`` and the address travels at run time; a global one would be frozen
into the cached code, which Numba refuses to cache).

Calling convention (CBLAS): ``gemm(order, transa, transb, M, N, K, alpha, A, lda, B, ldb,
beta, C, ldc)`` with C (M, N) = alpha op(A) op(B) + beta C; ``ROW_MAJOR``, ``NO_TRANS``,
``TRANS`` below; A, B, C are addresses (``arr.ctypes.data`` plus a byte offset).

Threads: the kernels run one head per Numba thread and call GEMM from each; OpenBLAS must then
use one thread per call (its own pool would fight Numba's for the same cores).
``blas_single_threaded()`` sets that for the duration of a ``with`` block and restores the
count after; measured cost of the two calls: 0.3 us.

Which libraries: NumPy wheels ship ``scipy_openblas64_`` (64-bit integers, symbols
``scipy_cblas_sgemm64_``); older wheels ``openblas64_`` (``cblas_sgemm64_``); 32-bit-integer
builds export ``cblas_sgemm``. Anything else (MKL, Apple Accelerate): ``gemm_for`` returns
None and callers use their batched-``np.matmul`` variant. ``gemm_for`` also checks the function
on a small product against NumPy once, so a mismatched signature falls back instead of
computing garbage.

Leaves out: complex types, BLAS vendors other than OpenBLAS.
"""
from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager

import numpy as np

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

# symbol patterns ({} = "s" or "d", {routine} = "gemm" or "gemv") with their integer type,
# tried in this order in every loaded OpenBLAS
_NAMES = (("scipy_cblas_{}{routine}64_", ctypes.c_int64), ("cblas_{}{routine}64_", ctypes.c_int64),
          ("scipy_cblas_{}{routine}", ctypes.c_int), ("cblas_{}{routine}", ctypes.c_int))
_cache: dict = {}


def _openblas_libs():
    """ctypes handles of the loaded OpenBLAS libraries (NumPy's bundled one, normally)."""
    paths = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                if "openblas" in os.path.basename(path).lower() and ".so" in path:
                    paths.add(path)
    except OSError:
        return []
    libs = []
    for p in sorted(paths):
        try:
            libs.append(ctypes.CDLL(p))
        except OSError:
            pass
    return libs


def _libs():
    if "libs" not in _cache:  # NumPy (imported above) has loaded its OpenBLAS by now
        _cache["libs"] = _openblas_libs()
    return _cache["libs"]


def _find(names):
    for lib in _libs():
        for name in names:
            fn = getattr(lib, name, None)
            if fn is not None:
                return fn
    return None


def _bind(routine: str, letter: str):
    """The ctypes function for cblas_<letter><routine>, its argument types set, or None."""
    real = {"s": ctypes.c_float, "d": ctypes.c_double}[letter]
    for pattern, i in _NAMES:
        fn = _find((pattern.format(letter, routine=routine),))
        if fn is None:
            continue
        e, p = ctypes.c_int, ctypes.c_void_p
        if routine == "gemm":  # order, transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc
            fn.argtypes = [e, e, e, i, i, i, real, p, i, p, i, real, p, i]
        else:  # gemv: order, trans, M, N, alpha, A, lda, x, incx, beta, y, incy
            fn.argtypes = [e, e, i, i, real, p, i, p, i, real, p, i]
        fn.restype = None
        return fn
    return None


def _works(routine: str, fn, dtype) -> bool:
    """One small product against NumPy: catches a wrong integer width or symbol."""
    if routine == "gemm":  # (3x5) @ (4x5)^T
        a = np.arange(15, dtype=dtype).reshape(3, 5)
        b = np.arange(20, dtype=dtype).reshape(4, 5) - 7
        c = np.full((3, 4), 99, dtype=dtype)
        fn(ROW_MAJOR, NO_TRANS, TRANS, 3, 4, 5, 1.0, a.ctypes.data, 5, b.ctypes.data, 5, 0.0,
           c.ctypes.data, 4)
        return bool(np.array_equal(c, a @ b.T))
    a = np.arange(12, dtype=dtype).reshape(4, 3) - 5  # gemv: (4x3)^T @ x
    x = np.arange(4, dtype=dtype) + 1
    y = np.full(3, 99, dtype=dtype)
    fn(ROW_MAJOR, TRANS, 4, 3, 1.0, a.ctypes.data, 3, x.ctypes.data, 1, 0.0, y.ctypes.data, 1)
    return bool(np.array_equal(y, a.T @ x))


def _routine(routine: str, dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        return None
    key = (routine, dtype)
    if key not in _cache:
        fn = _bind(routine, "s" if dtype == np.float32 else "d")
        _cache[key] = fn if fn is not None and _works(routine, fn, dtype) else None
    return _cache[key]


def gemm_for(dtype):
    """The CBLAS GEMM for float32 or float64 arrays as a ctypes function, or None if unavailable."""
    return _routine("gemm", dtype)


def gemv_for(dtype):
    """CBLAS GEMV (``gemv(order, trans, M, N, alpha, A, lda, x, incx, beta, y, incy)``: y =
    alpha op(A) x + beta y) for float32/float64 as a ctypes function, or None. A one-row product
    goes here rather than to GEMM, which would pack the whole weight matrix for one row
    (measured: (1, 384) @ (384, 8192) 469 us through GEMM, 85-115 us through GEMV)."""
    return _routine("gemv", dtype)


_GET_THREADS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                "openblas_get_num_threads64_", "openblas_get_num_threads")
_SET_THREADS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                "openblas_set_num_threads64_", "openblas_set_num_threads")


def _threads_fns():
    if "threads" not in _cache:
        get, set_ = _find(_GET_THREADS), _find(_SET_THREADS)
        if get is not None and set_ is not None:
            get.restype = ctypes.c_int
            set_.argtypes = [ctypes.c_int]
        _cache["threads"] = (get, set_) if get is not None and set_ is not None else None
    return _cache["threads"]


def blas_threads() -> int | None:
    """OpenBLAS's own pool size, or None when no OpenBLAS is loaded."""
    fns = _threads_fns()
    return None if fns is None else fns[0]()


def set_blas_threads(n: int) -> None:
    """Size OpenBLAS's own pool (no-op without OpenBLAS); tinylm keeps it at 1 (kernels/_threads.py)."""
    fns = _threads_fns()
    if fns is not None:
        fns[1](n)


@contextmanager
def blas_single_threaded():
    """OpenBLAS uses one thread per call inside the block (restored after, also on error)."""
    fns = _threads_fns()
    if fns is None:
        yield
        return
    get, set_ = fns
    n = get()
    set_(1)
    try:
        yield
    finally:
        set_(n)


_CORENAME = ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename64_",
             "openblas_get_corename")
_CONFIG = ("scipy_openblas_get_config64_", "scipy_openblas_get_config", "openblas_get_config64_",
           "openblas_get_config")


def blas_info() -> dict:
    """Which kernels OpenBLAS chose on this CPU (its ``get_corename``, what threadpoolctl reports as
    ``architecture``) and its build config; empty strings where no OpenBLAS is loaded. The machines
    this project runs on set OPENBLAS_CORETYPE=Haswell, which makes it run its AVX2 kernels on an
    AVX-512 CPU (docs/performance.md, "The OpenBLAS override")."""
    out = {}
    for key, names in (("corename", _CORENAME), ("config", _CONFIG)):
        fn = _find(names)
        if fn is None:
            out[key] = ""
            continue
        fn.restype = ctypes.c_char_p
        out[key] = (fn() or b"").decode("ascii", "replace")
    return out
