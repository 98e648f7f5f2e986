"""Kernels: array in, array out, no autograd.

One file per op family. Each holds, in this order: a docstring with the math, the shape legend
and a version log; the NumPy reference ``<op>_ref``; the Numba CPU kernel; the GPU kernel
(``numba.cuda``, launched on CuPy arrays); the registration; and a ``__main__`` that checks every
variant against the reference and times it.

Dispatch: ``kernels.get(op, *arrays)`` picks the backend from the array type (CuPy -> "gpu",
NumPy -> "cpu"); ``TINYLM_KERNELS=ref`` forces the NumPy references everywhere.
"""
import os as _os

# passive OpenMP waiting: see tinylm/__init__.py for the measurement (spinning Numba workers
# starve BLAS threads on small machines); set before Numba's OpenMP pool is first launched
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kernels.registry import available, backend_of, get, register  # noqa: E402

__all__ = ["available", "backend_of", "get", "register"]
