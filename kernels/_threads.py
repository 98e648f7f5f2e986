"""One thread count for Numba's parallel loops, which also run every tinylm BLAS call.

``TINYLM_NUM_THREADS`` (default: the cores this process may run on) is applied by
``apply_env()``; ``set_num_threads(n)`` changes it at run time.

How BLAS is threaded: tinylm's GEMMs (kernels/matmul.py, attention's cpu_gemm) cut C into one
block per Numba thread and call single-threaded OpenBLAS on each block, so n threads do the
BLAS work and n threads do the Numba kernels, and nothing else runs beside them. OpenBLAS's own
pool is set to 1 thread for the whole process. Why: after each threaded call OpenBLAS's
workers spin for a while, and libgomp's workers (Numba's) spin after each kernel; on 2 cores
the two pools take the cores from each other. Measured here: KV-cache generation at config M
went from 178-184 tokens/s to 7.9 tokens/s when its one-row products went through NumPy's
(OpenBLAS-threaded) matmul instead, and attention ran 2x slower right after a threaded GEMM.
A side effect to know: NumPy matmuls in the user's own code run on one thread once tinylm's
kernels are in use (``kernels._threads.set_blas_threads(n)`` gives them n again, at the risk
above when they interleave with tinylm's kernels).

How BLAS is reached without a dependency: NumPy's OpenBLAS (``scipy_openblas``, bundled in the
wheel) exports ``openblas_set_num_threads`` under a prefixed/suffixed name; kernels/_blas.py
finds the library among the loaded shared objects (/proc/self/maps) and calls it with ctypes.
Before NumPy is imported, ``OPENBLAS_NUM_THREADS`` does the same job, and before Numba is imported
``NUMBA_NUM_THREADS`` raises its pool's ceiling. threadpoolctl would do the lookup for every
BLAS vendor; it is not needed for the OpenBLAS that NumPy ships.

Measured pitfall with PyTorch in the same process (benchmarks, reference tests): Numba's "omp"
threading layer loads the system libgomp.so.1 when its pool starts; a torch imported after that
binds to the already-loaded soname instead of its bundled libgomp, and its SDPA fwd+bwd took
1.3-1.9 s instead of 24 ms. Importing torch first (its libgomp is then shared by Numba) showed
no slowdown. tinylm itself never imports torch.

Leaves out: MKL/BLIS builds of NumPy (set their own variables; tinylm's GEMMs then use
np.matmul and that library's threads), GPU streams.
"""
from __future__ import annotations

import os
import sys

_ENV = "TINYLM_NUM_THREADS"
_state = {"n": None}


def default_threads() -> int:
    """Cores this process may use (the affinity mask, which respects taskset/cgroups)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _requested() -> int:
    raw = os.environ.get(_ENV, "").strip()
    if not raw:
        return default_threads()
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{_ENV}={raw!r}: expected a positive integer") from None
    if n < 1:
        raise ValueError(f"{_ENV}={raw!r}: expected a positive integer")
    return n


def blas_num_threads() -> int | None:
    """OpenBLAS's own pool size, or None when no OpenBLAS is loaded."""
    from kernels._blas import blas_threads  # noqa: PLC0415 (imports NumPy)

    return blas_threads()


def set_blas_threads(n: int) -> None:
    """OpenBLAS's own pool size (tinylm keeps it at 1: see the module docstring)."""
    if "numpy" not in sys.modules:
        os.environ["OPENBLAS_NUM_THREADS"] = str(n)
    from kernels._blas import set_blas_threads as set_openblas  # noqa: PLC0415 (imports NumPy)

    set_openblas(n)


def _wait_passively_without_openblas() -> None:
    """Where NumPy's BLAS is not an OpenBLAS tinylm can call (MKL, Accelerate), its GEMMs go
    through np.matmul and that library's own threads, and the two-pool contention described
    above comes back; then Numba's OpenMP workers are told to sleep as soon as they are idle
    (OMP_WAIT_POLICY=PASSIVE, unless the user set it). It must be set before the OpenMP
    runtime loads, which is at Numba's first parallel launch: set_num_threads runs first."""
    from kernels._blas import gemm_for  # noqa: PLC0415

    if gemm_for("float32") is None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_num_threads(n: int) -> int:
    """Use n threads for Numba's kernels and tinylm's BLAS calls; returns the count Numba got.

    Numba cannot go above the pool it started with (NUMBA_NUM_THREADS, default: the cores);
    n is clipped to that ceiling. OpenBLAS's own pool is set to 1 (tinylm's GEMMs are split
    over Numba's n threads instead).
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    if "numba" not in sys.modules:
        os.environ.setdefault("NUMBA_NUM_THREADS", str(max(n, default_threads())))
    if "numpy" not in sys.modules:
        os.environ["OMP_NUM_THREADS"] = str(n)
    _wait_passively_without_openblas()
    import numba

    n = min(n, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    set_blas_threads(1)
    _state["n"] = n
    return n


def get_num_threads() -> int:
    """The thread count last set (applying TINYLM_NUM_THREADS first if nothing was set)."""
    if _state["n"] is None:
        apply_env()
    return _state["n"]


def apply_env() -> int:
    """Apply TINYLM_NUM_THREADS (default: the cores); called by kernels.registry when the first kernel is asked for."""
    return set_num_threads(_requested())
