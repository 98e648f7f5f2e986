"""RMSNorm over the last axis (Llama's norm): forward and backward.

Math (per row n of x, C channels):
    ms = sum(x^2)/C,  rstd = 1/sqrt(ms + eps),  xhat = x * rstd,  out = xhat * w
Backward (dout -> dx, dw), with dxhat = dout * w; from d rstd/d x_j = -rstd^3 x_j / C:
    dw = sum_n dout * xhat
    dx = rstd * (dxhat - xhat * mean_c(dxhat * xhat))
Shapes: N rows (B*T flattened), C channels. x, out, dout, dx (N, C); w, dw (C,); rstd (N,).

Accumulation: every variant sums in the input's dtype (float32 sums for float32 inputs, float64
for float64), so CPU and GPU round alike. Measured at C = 4096 (256 rows of 3 * N(0, 1)): the
float32 cpu kernel's rstd is within 1.3e-7 relative of a float64 computation (NumPy's float32
ref: 1.1e-7), about one float32 ulp, so a float64 accumulator would buy nothing visible.

Leaves out: no mean subtraction and no bias, by definition (that is LayerNorm); the
"(1 + w)" weight parametrisation of some models (pass w + 1).
References: Zhang & Sennrich 2019 "Root Mean Square Layer Normalization"; Llama's LlamaRMSNorm.

Version log (python -m kernels.rmsnorm: N=2048, C=384, float32, medians of 10; the 2 cores
were shared with other jobs (load average 3-5), so ranges over runs are given, and runs with
NUMBA_NUM_THREADS=1, which contention disturbs less):
  v1 cpu: prange over rows, one pass for the sum of squares (no mean to subtract, so no second
     pass), backward with 16 fixed row chunks each owning a partial dw row (as layernorm:
     race-free, independent of the thread count); float32 all through (see the typing note
     above the kernels). 2 threads: fwd 0.071-0.072 ms vs ref 0.52-0.71 ms (7-10x), bwd
     0.10-0.12 ms vs ref 1.7-2.4 ms (14-23x). 1 thread: fwd 0.09-0.12 ms vs ref 0.56-0.76 ms
     (5-6x), bwd 0.20-0.51 ms vs ref 2.0-2.3 ms (4.5-10x). While another job held one core,
     both 2-thread kernels took a flat 8.0 ms median: the second worker waits out a 4 ms
     scheduler tick (kernels/rope.py saw the same).
  gpu: one block of 128 threads per row, a shared-memory tree sum in the input dtype; dw one
     thread per column. Checked under the simulator and as PTX only (no GPU here).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from kernels._common import FASTMATH, array_module, launch_1d, load_cuda, main_check
from kernels.registry import register

cuda = None  # numba.cuda, bound on first GPU use by load_cuda (see kernels/_common.py)


@register("rmsnorm_fwd", "ref")
def rmsnorm_fwd_ref(x, w, eps):  # (N,C), (C,), float -> (N,C), (N,)
    xp = array_module(x)
    ms = (x * x).mean(axis=1)
    rstd = (1.0 / xp.sqrt(ms + eps)).astype(x.dtype)
    out = x * rstd[:, None] * w
    return out, rstd


@register("rmsnorm_bwd", "ref")
def rmsnorm_bwd_ref(dout, x, w, rstd):  # (N,C),(N,C),(C,),(N,) -> (N,C),(C,)
    xhat = x * rstd[:, None]
    dw = (dout * xhat).sum(axis=0)
    dxhat = dout * w
    dx = rstd[:, None] * (dxhat - xhat * (dxhat * xhat).mean(axis=1, keepdims=True))
    return dx, dw


# ---------------------------------------------------------------------------------------------
# Numba CPU. eps and inv_c = 1/C arrive typed as x's dtype, and zero / one are made from
# inv_c: Numba types a Python int mixed with a float32 (eps * 0, s / C, 1 / r) as float64
# (checked with inspect_types), which would run the row loops at half the SIMD width.

@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _rms_fwd_cpu(x, w, eps, inv_c, out, rstd):  # (N,C),(C,),scalar,scalar,(N,C),(N,)
    N, C = x.shape
    zero = inv_c - inv_c
    one = inv_c / inv_c
    for n in prange(N):
        xr = x[n]
        s = zero
        for c in range(C):
            s += xr[c] * xr[c]
        r = one / np.sqrt(s * inv_c + eps)
        orow = out[n]
        for c in range(C):
            orow[c] = xr[c] * r * w[c]
        rstd[n] = r


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _rms_bwd_cpu(dout, x, w, rstd, inv_c, dx, dw_part):
    # dw_part (P, C): one partial sum per fixed row chunk, so no two threads add into the same
    # dw element; the caller sums the P rows (as kernels/layernorm.py)
    N, C = x.shape
    P = dw_part.shape[0]
    zero = inv_c - inv_c
    for p in prange(P):
        lo = p * N // P
        hi = (p + 1) * N // P
        dwp = dw_part[p]
        for c in range(C):
            dwp[c] = zero
        for n in range(lo, hi):
            r = rstd[n]
            xr = x[n]
            dr = dout[n]
            # pass 1: mean(dxhat * xhat) and the dw partial
            s = zero
            for c in range(C):
                xh = xr[c] * r
                s += dr[c] * w[c] * xh
                dwp[c] += dr[c] * xh
            m = s * inv_c
            # pass 2: dx = r * (dxhat - xhat * m)
            dxr = dx[n]
            for c in range(C):
                dxr[c] = r * (dr[c] * w[c] - xr[c] * r * m)


def _inv(x):  # 1/C in x's dtype (C = 0 rows: any finite positive value, nothing is summed)
    return x.dtype.type(1.0 / max(x.shape[1], 1))


def _parts(N: int) -> int:
    return max(1, min(N, 16))  # 16 chunks balance 2..16 threads (as kernels/layernorm.py)


@register("rmsnorm_fwd", "cpu")
def rmsnorm_fwd_cpu(x, w, eps):
    N, C = x.shape
    out = np.empty_like(x)
    rstd = np.empty(N, dtype=x.dtype)
    _rms_fwd_cpu(x, w, x.dtype.type(eps), _inv(x), out, rstd)
    return out, rstd


@register("rmsnorm_bwd", "cpu")
def rmsnorm_bwd_cpu(dout, x, w, rstd):
    N, C = x.shape
    dx = np.empty_like(x)
    dw_part = np.empty((_parts(N), C), dtype=x.dtype)
    _rms_bwd_cpu(dout, x, w, rstd, _inv(x), dx, dw_part)
    return dx, dw_part.sum(axis=0)


# ---------------------------------------------------------------------------------------------
# GPU (numba.cuda): one block per row, a shared-memory tree sum whose buffer has x's dtype (the
# accumulator rule above); dw in a second kernel, one thread per column walking the rows
# (adjacent threads read adjacent addresses, nothing shared). The reduction is written out in
# each kernel: a device-function helper made compile_ptx ask for a driver (kernels/layernorm.py).

RMS_THREADS = 128  # power of two: the tree reduction halves it


def _rms_fwd_gpu_kernel(x, w, eps, inv_c, out, rstd):
    n = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    N, C = x.shape
    buf = cuda.shared.array(RMS_THREADS, dtype=x.dtype)
    if n < N:  # the whole block agrees, so every syncthreads below is reached by all threads
        s = inv_c - inv_c
        for c in range(tid, C, RMS_THREADS):
            s += x[n, c] * x[n, c]
        buf[tid] = s
        cuda.syncthreads()
        stride = RMS_THREADS // 2
        while stride > 0:
            if tid < stride:
                buf[tid] += buf[tid + stride]
            cuda.syncthreads()
            stride //= 2
        r = (inv_c / inv_c) / math.sqrt(buf[0] * inv_c + eps)
        for c in range(tid, C, RMS_THREADS):
            out[n, c] = x[n, c] * r * w[c]
        if tid == 0:
            rstd[n] = r


def _rms_bwd_dx_gpu_kernel(dout, x, w, rstd, inv_c, dx):
    n = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    N, C = x.shape
    buf = cuda.shared.array(RMS_THREADS, dtype=x.dtype)
    if n < N:
        r = rstd[n]
        s = inv_c - inv_c
        for c in range(tid, C, RMS_THREADS):
            s += dout[n, c] * w[c] * x[n, c] * r
        buf[tid] = s
        cuda.syncthreads()
        stride = RMS_THREADS // 2
        while stride > 0:
            if tid < stride:
                buf[tid] += buf[tid + stride]
            cuda.syncthreads()
            stride //= 2
        m = buf[0] * inv_c
        for c in range(tid, C, RMS_THREADS):
            dx[n, c] = r * (dout[n, c] * w[c] - x[n, c] * r * m)


def _rms_bwd_dw_gpu_kernel(dout, x, rstd, zero, dw):
    c = cuda.grid(1)
    N, C = x.shape
    if c < C:
        s = zero
        for n in range(N):
            s += dout[n, c] * x[n, c] * rstd[n]
        dw[c] = s


_GPU = {}


def _gpu():
    if not _GPU:
        cu = load_cuda(globals())
        _GPU["fwd"] = cu.jit(_rms_fwd_gpu_kernel)
        _GPU["dx"] = cu.jit(_rms_bwd_dx_gpu_kernel)
        _GPU["dw"] = cu.jit(_rms_bwd_dw_gpu_kernel)
    return _GPU


@register("rmsnorm_fwd", "gpu")
def rmsnorm_fwd_gpu(x, w, eps):
    xp = array_module(x)
    N, C = x.shape
    out = xp.empty_like(x)
    rstd = xp.empty(N, dtype=x.dtype)
    if N:
        _gpu()["fwd"][N, RMS_THREADS](x, w, x.dtype.type(eps), _inv(x), out, rstd)
    return out, rstd


@register("rmsnorm_bwd", "gpu")
def rmsnorm_bwd_gpu(dout, x, w, rstd):
    xp = array_module(x)
    N, C = x.shape
    dx = xp.empty_like(x)
    if N == 0:
        return dx, xp.zeros(C, dtype=x.dtype)
    dw = xp.empty(C, dtype=x.dtype)
    k = _gpu()
    k["dx"][N, RMS_THREADS](dout, x, w, rstd, _inv(x), dx)
    k["dw"][launch_1d(C)](dout, x, rstd, x.dtype.type(0), dw)
    return dx, dw


def gpu_kernels_for_ptx():
    """(name, python function, float32 signature) of each GPU kernel, for compile_ptx checks."""
    from numba import float32, void
    load_cuda(globals())
    m, v = float32[:, ::1], float32[::1]
    return [
        ("rmsnorm_fwd", _rms_fwd_gpu_kernel, void(m, v, float32, float32, m, v)),
        ("rmsnorm_bwd_dx", _rms_bwd_dx_gpu_kernel, void(m, m, v, v, float32, m)),
        ("rmsnorm_bwd_dw", _rms_bwd_dw_gpu_kernel, void(m, m, v, float32, v)),
    ]


VARIANTS = {
    "rmsnorm_fwd": {"ref": rmsnorm_fwd_ref, "cpu": rmsnorm_fwd_cpu, "gpu": rmsnorm_fwd_gpu},
    "rmsnorm_bwd": {"ref": rmsnorm_bwd_ref, "cpu": rmsnorm_bwd_cpu, "gpu": rmsnorm_bwd_gpu},
}


if __name__ == "__main__":
    N, C = 2048, 384  # B*T = 8*256 rows of a d_model=384 model (as kernels/layernorm.py)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((N, C)).astype(np.float32)
    ws = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
    ds = rng.standard_normal((N, C)).astype(np.float32)
    _, rs = rmsnorm_fwd_ref(xs, ws, 1e-6)
    main_check(VARIANTS, {
        "rmsnorm_fwd": (lambda xp: (xp.asarray(xs), xp.asarray(ws), 1e-6), ()),
        "rmsnorm_bwd": (lambda xp: tuple(xp.asarray(a) for a in (ds, xs, ws, rs)), ()),
    })
