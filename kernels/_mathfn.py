"""Vectorisable transcendental helpers for Numba kernels: ``fexp`` and ``ftanh``.

Why: there is no SVML for Numba on these machines, so ``np.exp``/``np.tanh`` inside a Numba
loop become one libm call per element and block vectorisation. Measured here on 4M float32
values in [-80, 0]: ``np.exp`` in a Numba loop 16.2 ms, NumPy's own SIMD ``np.exp`` 4.3 ms,
the float32 ``fexp`` below 2.0 ms (AVX-512, no calls).

``fexp(x)`` for float32: Cody-Waite range reduction x = k*ln2 + r, |r| <= ln2/2, a degree-7
Taylor polynomial for exp(r), and 2^k built from its IEEE bits (scalar ``.view`` vectorises).
The argument is clamped to [-87, 88] so the result is always a normal float: exp(-87) =
1.6e-38 > FLT_MIN, which also keeps softmax outputs away from the subnormals that cost 100x
(docs/performance.md, "Pitfalls: denormals"). Measured relative error against float64 exp on [-80, 0]: 2.8e-7 (~2.3 ulp);
tests/test_kernels_mathfn.py checks a bound of 5e-7 on a dense grid. For float64 arguments
``fexp`` is ``math.exp`` (exact; float64 is for gradient checks, where accuracy beats speed).

``ftanh(u)`` = (1 - e) / (1 + e) with e = fexp(-2u): absolute error <= 1.2e-7 in
float32 (tested), exact ``math.tanh`` in float64.

Kernels calling these must use ``error_model="numpy"``: with Numba's default "python" error
model every float division checks for zero and raises, which kept the tanh loop scalar
(``divss``, 15 ms on 4M float32) until switched (1.2 ms, ``vdivps``/AVX-512).

Edits here do not invalidate the Numba cache of kernels that inline these helpers (Numba's
cache keys on the kernel's own file): delete ``kernels/__pycache__/*.nb[ic]`` after an edit.

Leaves out: log (only called once per row, where libm is fine), NaN inputs (NaN propagates
through the clamp as max/min of NaN is unspecified; kernels here never feed NaN on purpose).
"""
from __future__ import annotations

import math

import numpy as np
from numba import types
from numba.extending import overload

from kernels._common import FASTMATH


def fexp(x):
    """exp(x); pure-Python fallback for NUMBA_DISABLE_JIT=1."""
    return math.exp(x)


def ftanh(x):
    """tanh(x); pure-Python fallback for NUMBA_DISABLE_JIT=1."""
    return math.tanh(x)


def _exp32(x):
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    k = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    # ln2 split in two so k*ln2_hi is exact in float32 (Cody-Waite)
    r = x - k * np.float32(0.693145751953125)
    r = r - k * np.float32(1.428606765330187e-06)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    bits = np.int32((np.int32(k) + np.int32(127)) << 23)
    return p * bits.view(np.float32)


def _exp64(x):
    return math.exp(x)


def _tanh32(x):
    # no sign select: for x < 0, e = exp(2|x|) is large but finite (fexp clamps at 88), and
    # (1-e)/(1+e) -> -1 correctly; a select here stopped vectorisation (17 ms vs 1.3 ms on 4M)
    e = fexp(np.float32(-2.0) * x)
    return (np.float32(1.0) - e) / (np.float32(1.0) + e)


def _tanh64(x):
    return math.tanh(x)


@overload(fexp, jit_options={"fastmath": FASTMATH, "error_model": "numpy"}, inline="always")
def _ov_fexp(x):
    if isinstance(x, types.Float):
        return _exp32 if x.bitwidth == 32 else _exp64
    return None


@overload(ftanh, jit_options={"fastmath": FASTMATH, "error_model": "numpy"}, inline="always")
def _ov_ftanh(x):
    if isinstance(x, types.Float):
        return _tanh32 if x.bitwidth == 32 else _tanh64
    return None
