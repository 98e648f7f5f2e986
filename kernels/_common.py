"""Helpers shared by the kernel families: fastmath flags, the array-module helper, lazy CUDA.

- ``FASTMATH``: the one flag set every Numba kernel uses. It leaves out ``nnan`` and ``ninf``
  so ``np.isnan``/``np.isinf`` checks and NaN propagation keep working (STUMPY and numbagg do
  the same); ``reassoc`` is what lets LLVM vectorise float reductions.
- ``array_module(a)``: ``numpy`` or ``cupy`` for an array, so a ``_ref`` is written once for both.
- ``load_cuda(globals())``: imports ``numba.cuda`` on first use and binds it as the global name
  ``cuda`` of the calling family module. GPU kernels are plain module-level functions that
  say ``cuda.grid(1)``; they are wrapped with ``cuda.jit`` only when first launched. Two reasons
  for this shape, both measured here: (1) ``import numba.cuda`` adds ~0.1 s to the warm start,
  and importing it fixes the simulator-or-not choice for the whole process, so a family import
  must not do it; (2) Numba's CUDA simulator swaps the *module global* that refers to
  ``numba.cuda`` for its per-thread fake, so a kernel that reaches ``cuda`` through a closure
  fails under the simulator with "module 'numba.cuda' has no attribute 'grid'" (tried first).

Leaves out: device selection, streams (kernels launch on the default stream, as CuPy does).
"""
from __future__ import annotations

import os
import sys

import numpy as np

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}  # a set: Numba rejects a frozenset
# Every CPU kernel also passes error_model="numpy": Numba's default "python" model tests every
# float division for zero and raises, which keeps the loop scalar (see kernels/_mathfn.py).

# Threads per block for 1-D GPU launches; 256 is a multiple of the 32-lane warp and leaves room
# for several resident blocks per SM on sm_80/sm_90.
GPU_THREADS = 256


def is_cupy(a) -> bool:
    return type(a).__module__.startswith("cupy")


def array_module(*arrays):
    """``cupy`` if any argument is a CuPy array, else ``numpy``."""
    for a in arrays:
        if is_cupy(a):
            return sys.modules["cupy"]
    return np


def to_numpy(a) -> np.ndarray:
    return a.get() if is_cupy(a) else np.asarray(a)


def cuda_simulated() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def gpu_unavailable_reason() -> str | None:
    """None when GPU kernels can run here (a real GPU with CuPy, or the simulator), else why not."""
    if cuda_simulated():
        return None
    try:
        import cupy  # noqa: F401
    except Exception as e:  # ImportError, or a CuPy built for another CUDA
        return f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        from numba import cuda
        if not cuda.is_available():
            return "numba.cuda finds no usable GPU/driver"
    except Exception as e:
        return f"numba.cuda failed to initialise ({type(e).__name__}: {e})"
    return None


def load_cuda(module_globals: dict):
    """Import numba.cuda and bind it as ``cuda`` in the family module's globals; return it."""
    from numba import cuda

    module_globals["cuda"] = cuda
    return cuda


def launch_1d(n: int, threads: int = GPU_THREADS) -> tuple[int, int]:
    """(blocks, threads) covering n elements, at least one block."""
    return max(1, (n + threads - 1) // threads), threads


def check_same_dtype(*arrays) -> None:
    dt = arrays[0].dtype
    for a in arrays[1:]:
        if a.dtype != dt:
            raise TypeError(f"dtype mismatch: {dt} vs {a.dtype}")


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _outputs(op_fn, args, inplace_idx):
    out = op_fn(*args)
    if inplace_idx:  # in-place ops (AdamW): the outputs are the updated arguments
        return tuple(to_numpy(args[i]) for i in inplace_idx)
    return tuple(to_numpy(o) if hasattr(o, "shape") else np.asarray(o) for o in _as_tuple(out))


def main_check(variants: dict, cases: dict, repeats: int = 10) -> None:
    """The ``__main__`` of a family: check every variant against "ref", then time it.

    cases: op -> (make_args(xp) -> tuple, inplace_idx tuple). GPU variants run when a GPU or the
    simulator is available (the simulator is slow: only the check runs there, not the timing).
    """
    import time

    gpu_why = gpu_unavailable_reason()
    for op, table in variants.items():
        make_args, inplace_idx = cases[op]
        ref_out = _outputs(table["ref"], make_args(np), inplace_idx)
        for name, fn in table.items():
            on_gpu = name.startswith("gpu")
            if on_gpu and gpu_why:
                print(f"{op:20s} {name:10s} skipped: {gpu_why}")
                continue
            xp = np
            if on_gpu and not cuda_simulated():
                import cupy as xp
            out = _outputs(fn, make_args(xp), inplace_idx)
            err = max(float(np.max(np.abs(o.astype(np.float64) - r), initial=0.0))
                      for o, r in zip(out, ref_out))
            if on_gpu and cuda_simulated():
                print(f"{op:20s} {name:10s} max|diff| {err:.2e} (simulator, not timed)")
                continue
            args = make_args(xp)
            fn(*args)  # JIT warm-up
            ts = []
            for _ in range(repeats):
                if on_gpu:
                    xp.cuda.Device().synchronize()
                t0 = time.perf_counter()
                fn(*args)
                if on_gpu:
                    xp.cuda.Device().synchronize()
                ts.append(time.perf_counter() - t0)
            print(f"{op:20s} {name:10s} max|diff| {err:.2e}  median {1e3 * np.median(ts):8.3f} ms")
