"""Array backends: NumPy on the CPU, CuPy on the GPU.

Everything GPU is imported lazily: ``import tinylm`` never touches CuPy, and a machine without
CuPy or without a GPU gets a clear ``RuntimeError`` that says which of the two is missing, only
when it asks for the GPU.
"""
from __future__ import annotations

import numpy as np

_cupy = None
_cupy_error: str | None = None


def xp_of(*arrays):
    """The array module (numpy or cupy) of the arrays: cupy if any of them is a CuPy array."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            return get_cupy()
    return np


def is_gpu_array(a) -> bool:
    return type(a).__module__.startswith("cupy")


def get_cupy():
    """Import CuPy and check a GPU is visible; raise RuntimeError saying why not otherwise."""
    global _cupy, _cupy_error
    if _cupy is not None:
        return _cupy
    if _cupy_error is None:
        try:
            import cupy  # noqa: PLC0415 (lazy on purpose)
        except Exception as e:  # ImportError, or a CUDA library that fails to load
            _cupy_error = (
                f"the GPU backend is unavailable: CuPy could not be imported ({type(e).__name__}: {e}). "
                "Install it with `pip install 'tinylm[gpu]'` on a machine with an NVIDIA GPU and driver."
            )
        else:
            try:
                n = cupy.cuda.runtime.getDeviceCount()
            except Exception as e:
                n, why = 0, f"{type(e).__name__}: {e}"
            else:
                why = "no CUDA device is visible"
            if n == 0:
                _cupy_error = f"the GPU backend is unavailable: CuPy is installed but {why}."
            else:
                _cupy = cupy
                return cupy
    raise RuntimeError(_cupy_error)


def gpu_available() -> bool:
    try:
        get_cupy()
    except RuntimeError:
        return False
    return True


def to_device(a, device: str):
    """Copy an array to "cpu" (NumPy) or "gpu" (CuPy); returns ``a`` itself when it is already there."""
    if device == "cpu":
        return a.get() if is_gpu_array(a) else a
    if device in ("gpu", "cuda"):
        cp = get_cupy()
        return a if is_gpu_array(a) else cp.asarray(a)
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'gpu'")


def scatter_add(xp, target, index, values) -> None:
    """target[index] += values with repeated indices accumulated (np.add.at; cupyx on the GPU)."""
    if xp is np:
        np.add.at(target, index, values)
    else:
        import cupyx  # noqa: PLC0415

        cupyx.scatter_add(target, index, values)
