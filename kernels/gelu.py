"""GELU, GPT-2's tanh approximation: forward and backward, elementwise.

Math: s = sqrt(2/pi), u = s*(x + 0.044715 x^3), t = tanh(u)
    out = 0.5 x (1 + t)
    dx  = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3*0.044715 x^2))
Shapes: any; kernels work on the flattened array.

CPU: float32 uses ``ftanh`` (kernels/_mathfn.py: vectorisable, absolute error <= 1.2e-7,
so |out - exact| <= 0.5|x| * 1.2e-7); float64 uses exact math.tanh (scalar, for gradchecks).

Leaves out: the exact erf GELU (GPT-2 uses the tanh form).
References: Hendrycks & Gimpel 2016 "Gaussian Error Linear Units"; llm.c gelu_forward/backward.

Version log (python -m kernels.gelu: 8 x 256 x 1536 float32, 2 threads, medians):
  v0 np.tanh inside the Numba loop: one libm call per element, no SIMD: 45 ms fwd+bwd against
     PyTorch's 10.7 ms, lost to NumPy too (docs/performance.md, "Pitfalls: no SVML for Numba").
  v1 ftanh from exp, but with Numba's default error_model="python": every division checks for
     zero, the loop stayed scalar (15 ms for tanh on 4M values).
  v2 error_model="numpy": vectorised (AVX-512). fwd 1.33 ms vs ref 8.1 ms (6x); bwd 1.78 ms vs
     ref 16.0 ms (9x).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from kernels._common import FASTMATH, array_module, launch_1d, load_cuda, main_check
from kernels._mathfn import ftanh
from kernels.registry import register

cuda = None  # numba.cuda, bound on first GPU use by load_cuda (see kernels/_common.py)

GELU_S = math.sqrt(2.0 / math.pi)
GELU_K = 0.044715


@register("gelu_fwd", "ref")
def gelu_fwd_ref(x):  # any shape -> same shape
    xp = array_module(x)
    t = xp.tanh(GELU_S * (x + GELU_K * x * x * x))
    return 0.5 * x * (1.0 + t)


@register("gelu_bwd", "ref")
def gelu_bwd_ref(dout, x):  # any shape, same shape -> same shape
    xp = array_module(x)
    t = xp.tanh(GELU_S * (x + GELU_K * x * x * x))
    dt = (1.0 - t * t) * (GELU_S * (1.0 + 3.0 * GELU_K * x * x))
    return dout * (0.5 * (1.0 + t) + 0.5 * x * dt)



# ---------------------------------------------------------------------------------------------
# Numba CPU: one flat loop; s, k, half, one arrive typed as the array's dtype so float32 stays
# float32 (a Python float literal would promote the loop to float64 and halve the SIMD width).

@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _gelu_fwd_cpu(x, out, s, k):  # (n,), (n,) flat
    half = s * 0 + 0.5
    one = s * 0 + 1
    for i in prange(x.size):
        xi = x[i]
        t = ftanh(s * (xi + k * xi * xi * xi))
        out[i] = half * xi * (one + t)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _gelu_bwd_cpu(dout, x, dx, s, k):  # (n,) x3 flat
    half = s * 0 + 0.5
    one = s * 0 + 1
    three = s * 0 + 3
    for i in prange(x.size):
        xi = x[i]
        t = ftanh(s * (xi + k * xi * xi * xi))
        # d out/dx = 0.5(1+t) + 0.5 x (1-t^2) s (1 + 3k x^2), from out = 0.5 x (1+t)
        dt = (one - t * t) * s * (one + three * k * xi * xi)
        dx[i] = dout[i] * (half * (one + t) + half * xi * dt)


@register("gelu_fwd", "cpu")
def gelu_fwd_cpu(x):
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    # ravel() here, never reshape inside the kernel: a parallel loop skipped its body when the
    # kernel reshaped its argument (docs/performance.md, "Pitfalls: a parallel loop that
    # silently did nothing")
    _gelu_fwd_cpu(x.ravel(), out.ravel(), x.dtype.type(GELU_S), x.dtype.type(GELU_K))
    return out


@register("gelu_bwd", "cpu")
def gelu_bwd_cpu(dout, x):
    x = np.ascontiguousarray(x)
    dx = np.empty_like(x)
    _gelu_bwd_cpu(np.ascontiguousarray(dout).ravel(), x.ravel(), dx.ravel(),
                  x.dtype.type(GELU_S), x.dtype.type(GELU_K))
    return dx


# ---------------------------------------------------------------------------------------------
# GPU: one thread per element (grid-stride), math.tanh is a fast intrinsic there.

def _gelu_fwd_gpu_kernel(x, out, s, k):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, x.size, stride):
        xi = x[i]
        out[i] = 0.5 * xi * (1.0 + math.tanh(s * (xi + k * xi * xi * xi)))


def _gelu_bwd_gpu_kernel(dout, x, dx, s, k):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, x.size, stride):
        xi = x[i]
        t = math.tanh(s * (xi + k * xi * xi * xi))
        dt = (1.0 - t * t) * s * (1.0 + 3.0 * k * xi * xi)
        dx[i] = dout[i] * (0.5 * (1.0 + t) + 0.5 * xi * dt)


_GPU = {}


def _gpu():
    if not _GPU:
        cu = load_cuda(globals())
        _GPU["fwd"] = cu.jit(_gelu_fwd_gpu_kernel)
        _GPU["bwd"] = cu.jit(_gelu_bwd_gpu_kernel)
    return _GPU


def _grid(n):
    blocks, threads = launch_1d(n)
    return min(blocks, 4096), threads  # grid-stride loop covers the rest


@register("gelu_fwd", "gpu")
def gelu_fwd_gpu(x):
    xp = array_module(x)
    x = xp.ascontiguousarray(x)
    out = xp.empty_like(x)
    _gpu()["fwd"][_grid(x.size)](x.ravel(), out.ravel(), GELU_S, GELU_K)
    return out


@register("gelu_bwd", "gpu")
def gelu_bwd_gpu(dout, x):
    xp = array_module(x)
    x = xp.ascontiguousarray(x)
    dx = xp.empty_like(x)
    _gpu()["bwd"][_grid(x.size)](xp.ascontiguousarray(dout).ravel(), x.ravel(), dx.ravel(),
                                 GELU_S, GELU_K)
    return dx


def gpu_kernels_for_ptx():
    """(name, python function, float32 signature) of each GPU kernel, for compile_ptx checks."""
    from numba import float32, float64, void
    load_cuda(globals())
    v = float32[::1]
    return [
        ("gelu_fwd", _gelu_fwd_gpu_kernel, void(v, v, float64, float64)),
        ("gelu_bwd", _gelu_bwd_gpu_kernel, void(v, v, v, float64, float64)),
    ]


VARIANTS = {
    "gelu_fwd": {"ref": gelu_fwd_ref, "cpu": gelu_fwd_cpu, "gpu": gelu_fwd_gpu},
    "gelu_bwd": {"ref": gelu_bwd_ref, "cpu": gelu_bwd_cpu, "gpu": gelu_bwd_gpu},
}


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    shape = (8, 256, 4 * 384)  # the MLP hidden activation of a B=8, T=256, d=384 GPT
    xs = (2 * rng.standard_normal(shape)).astype(np.float32)
    ds = rng.standard_normal(shape).astype(np.float32)
    main_check(VARIANTS, {
        "gelu_fwd": (lambda xp: (xp.asarray(xs),), ()),
        "gelu_bwd": (lambda xp: (xp.asarray(ds), xp.asarray(xs)), ()),
    })
