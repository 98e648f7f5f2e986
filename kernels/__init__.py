"""Kernels: array in, array out, no autograd.

One file per op family. Each holds, in this order: a docstring with the math, the shape legend
and a version log; the NumPy reference ``<op>_ref``; the Numba CPU kernel; the GPU kernel
(``numba.cuda``, launched on CuPy arrays); the registration; and a ``__main__`` that checks every
variant against the reference and times it.

Dispatch: ``kernels.get(op, *arrays)`` picks the backend from the array type (CuPy -> "gpu",
NumPy -> "cpu"); ``TINYLM_KERNELS=ref`` forces the NumPy references everywhere.
"""
import os as _os

# Numba's OpenMP workers spin after each parallel kernel by default, and so do OpenBLAS's
# threads after each GEMM; a model alternates the two, so on 2 cores each pool's spinning
# starves the other. Measured here (2 cores, M config): KV-cache generation 7.6 -> 224 tokens/s,
# training step S 426 -> 230 ms, M 2189 -> 1942 ms with passive waiting. Set here, before Numba
# loads the OpenMP runtime (at the first parallel launch), so `import tinylm` (which imports
# kernels) and standalone kernel use both get it; a user's own value wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kernels.registry import available, backend_of, get, register  # noqa: E402

__all__ = ["available", "backend_of", "get", "register"]
