"""AdamW: one fused in-place update of a flat parameter buffer.

Math (step t >= 1, as torch.optim.AdamW with amsgrad=False):
    p <- p * (1 - lr * weight_decay)                  (decoupled weight decay)
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
Shapes: p, g, m, v (N,) contiguous, one buffer for a whole parameter group.

CPU: one pass over the four buffers (reads p, g, m, v; writes p, m, v: 28 bytes per float32
parameter), the scalars folded in Python once per call.

Leaves out: amsgrad, maximize, per-parameter lr.
References: Loshchilov & Hutter 2019 "Decoupled Weight Decay Regularization"; torch.optim.AdamW.

Version log (python -m kernels.adamw: 13.9M float32 parameters, 2 threads, medians):
  v1 cpu: one prange pass. 7.7 ms vs ref 103 ms (13x); PyTorch fused AdamW 10.5 ms, for-loop
     38 ms (docs/performance.md, "PyTorch reference points"). 7.7 ms for 389 MB moved is ~50 GB/s: memory-bound.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from kernels._common import FASTMATH, array_module, launch_1d, load_cuda, main_check
from kernels.registry import register

cuda = None  # numba.cuda, bound on first GPU use by load_cuda (see kernels/_common.py)


@register("adamw_update", "ref")
def adamw_update_ref(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):  # (N,) x4 -> None
    xp = array_module(p)
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    p *= 1.0 - lr * weight_decay
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    denom = xp.sqrt(v) / math.sqrt(bc2) + eps
    p -= (lr / bc1) * (m / denom)



def _scalars(dtype, lr, beta1, beta2, eps, weight_decay, step):
    """The per-call constants, typed as the buffers' dtype (float32 stays float32 in the loop)."""
    t = np.dtype(dtype).type
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    return (t(1.0 - lr * weight_decay), t(beta1), t(1.0 - beta1), t(beta2), t(1.0 - beta2),
            t(lr / bc1), t(1.0 / math.sqrt(bc2)), t(eps))


# ---------------------------------------------------------------------------------------------
# Numba CPU

@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _adamw_cpu(p, g, m, v, decay, b1, omb1, b2, omb2, step_size, inv_sqrt_bc2, eps):
    for i in prange(p.size):
        gi = g[i]
        mi = b1 * m[i] + omb1 * gi
        vi = b2 * v[i] + omb2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * mi / (np.sqrt(vi) * inv_sqrt_bc2 + eps)


@register("adamw_update", "cpu")
def adamw_update_cpu(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    _adamw_cpu(p, g, m, v, *_scalars(p.dtype, lr, beta1, beta2, eps, weight_decay, step))


# ---------------------------------------------------------------------------------------------
# GPU: one thread per element, grid-stride.

def _adamw_gpu_kernel(p, g, m, v, decay, b1, omb1, b2, omb2, step_size, inv_sqrt_bc2, eps):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, p.size, stride):
        gi = g[i]
        mi = b1 * m[i] + omb1 * gi
        vi = b2 * v[i] + omb2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * mi / (math.sqrt(vi) * inv_sqrt_bc2 + eps)


_GPU = {}


def _gpu():
    if not _GPU:
        cu = load_cuda(globals())
        _GPU["update"] = cu.jit(_adamw_gpu_kernel)
    return _GPU


@register("adamw_update", "gpu")
def adamw_update_gpu(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    blocks, threads = launch_1d(p.size)
    _gpu()["update"][min(blocks, 4096), threads](
        p, g, m, v, *_scalars(p.dtype, lr, beta1, beta2, eps, weight_decay, step))


def gpu_kernels_for_ptx():
    """(name, python function, float32 signature) of each GPU kernel, for compile_ptx checks."""
    from numba import float32, void
    load_cuda(globals())
    a = float32[::1]
    return [("adamw_update", _adamw_gpu_kernel, void(a, a, a, a, *([float32] * 8)))]


VARIANTS = {"adamw_update": {"ref": adamw_update_ref, "cpu": adamw_update_cpu,
                             "gpu": adamw_update_gpu}}


if __name__ == "__main__":
    n = 13_900_000  # parameters of the M-sized GPT
    rng = np.random.default_rng(0)
    p_ = (0.02 * rng.standard_normal(n)).astype(np.float32)
    g_ = (1e-3 * rng.standard_normal(n)).astype(np.float32)
    m_ = (1e-4 * rng.standard_normal(n)).astype(np.float32)
    v_ = (1e-7 * rng.random(n)).astype(np.float32)
    main_check(VARIANTS, {
        "adamw_update": (lambda xp: tuple(xp.array(a) for a in (p_, g_, m_, v_))
                         + (3e-4, 0.9, 0.95, 1e-8, 0.1, 7), (0, 2, 3)),
    })
