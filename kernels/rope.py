"""Rotary position embedding (RoPE): forward and backward, and the cos/sin tables.

Math: each head vector x (hs,) at position t is cut into hs/2 pairs (x1_i, x2_i); pair i is
rotated by the angle a = t * theta^(-2i/hs):
    out1 = x1 cos a - x2 sin a,  out2 = x2 cos a + x1 sin a
Backward: a rotation's Jacobian is the rotation itself, so dx is dout rotated by -a (its
transpose): dx1 = d1 cos a + d2 sin a,  dx2 = d2 cos a - d1 sin a. The kernels take a sign
and run the same loop for both.
Pairs: interleaved=False is the half-split layout of Hugging Face Llama's ``rotate_half``,
pairs (i, i + hs/2); interleaved=True is the original paper's (and Meta's reference code's)
pairs (2i, 2i+1). The two are one permutation of the head's channels apart, so a checkpoint
converted between them permutes its q, k projection rows (tests/test_kernels_llama.py).
Shapes: B batch, T time, NH heads, hs head size (even). x, out, dout, dx (B, T, NH, hs);
cos, sin (T, hs/2), row t for the token at time t (``rope_tables`` builds them for any
positions, e.g. offset by a KV cache's length).

Layout: the "ref" variant takes x of any strides (a view into a fused projection works); the
"cpu" and "gpu" variants copy a non-C-contiguous x first (the copy is skipped when x is
contiguous; tinylm.functional.rope passes contiguous arrays). Outputs are C-contiguous.

Leaves out: scaled / extended-context RoPE variants (NTK, YaRN, Llama 3.1's frequency
scaling: they change only the tables, so build your own cos/sin), partial rotary dims.
References: Su et al. 2021 "RoFormer: Enhanced Transformer with Rotary Position Embedding";
Hugging Face transformers' LlamaRotaryEmbedding / rotate_half.

Version log (python -m kernels.rope [--interleaved]: B=8, T=256, NH=6, hs=64 float32,
medians of 10; the 2 cores were shared with other jobs (load average 3-5): ranges over runs,
and runs with NUMBA_NUM_THREADS=1, which contention disturbs less):
  v1 cpu: prange over the B*T rows, heads and pairs inside, the row's cos/sin (hs/2 each) stay
     in L1 across its heads. Half-split, 2 threads: fwd 0.053-0.079 ms vs ref 1.3-1.8 ms
     (20-26x), bwd 0.066-0.095 ms vs ref 1.2-2.3 ms; 1 thread: fwd 0.10-0.11 ms vs ref 1.3-1.5
     ms (12-15x), bwd 0.09-0.11 ms vs ref 0.9-1.2 ms (8-14x). Interleaved, 1 thread: fwd 0.15 ms
     vs ref 2.3 ms (15x), bwd 0.12 ms vs ref 1.7 ms (14x). The ref pays for four
     (B, T, NH, hs/2) temporaries and two strided writes.
     Under contention (another job at 100% of one core) every 2-thread run took a flat 8.0 ms
     median, 4.0 ms min, whatever the loop: the second Numba worker waits for a 4 ms scheduler
     tick. Compare kernels on a quiet machine or with one thread.
  gpu: one thread per (row, head, pair), grid-stride. Checked under the simulator and as PTX
     only (no GPU here).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels._common import FASTMATH, array_module, launch_1d, load_cuda, main_check
from kernels.registry import register

cuda = None  # numba.cuda, bound on first GPU use by load_cuda (see kernels/_common.py)


def rope_tables(hs: int, positions, theta: float = 10000.0, dtype=np.float32):
    """cos, sin (len(positions), hs/2) of the angles positions[t] * theta^(-2i/hs).

    Computed in float64 and then cast: at t = 4096 an angle rounded to float32 is off by up to
    2.4e-4 rad, more than one position step of the slowest pair (theta^(-62/64) = 1.3e-4 rad
    at hs = 64), which would blur neighbouring positions there.
    Example: hs=4, positions=[0, 1] -> inv_freq [1, 0.01]; cos [[1, 1], [0.5403, 0.99995]].
    """
    if hs % 2:
        raise ValueError(f"rope_tables: head size must be even, got {hs}")
    xp = array_module(positions)
    inv_freq = theta ** (-xp.arange(0, hs, 2, dtype=np.float64) / hs)  # (hs/2,)
    angle = xp.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, hs/2)
    return xp.cos(angle).astype(dtype), xp.sin(angle).astype(dtype)


def _rotate_ref(x, cos, sin, interleaved, sgn):  # rotate pairs by sgn * angle
    xp = array_module(x)
    h = x.shape[-1] // 2
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :h], x[..., h:])
    c = cos[None, :, None, :]  # (1, T, 1, hs/2): broadcast over batch and heads
    s = sgn * sin[None, :, None, :]
    out = xp.empty(x.shape, dtype=x.dtype)
    o1, o2 = (out[..., 0::2], out[..., 1::2]) if interleaved else (out[..., :h], out[..., h:])
    o1[...] = x1 * c - x2 * s
    o2[...] = x2 * c + x1 * s
    return out


@register("rope_fwd", "ref")
def rope_fwd_ref(x, cos, sin, interleaved):  # (B,T,NH,hs), (T,hs/2) x2, bool -> (B,T,NH,hs)
    return _rotate_ref(x, cos, sin, interleaved, 1)


@register("rope_bwd", "ref")
def rope_bwd_ref(dout, cos, sin, interleaved):  # (B,T,NH,hs), (T,hs/2) x2, bool -> (B,T,NH,hs)
    return _rotate_ref(dout, cos, sin, interleaved, -1)


# ---------------------------------------------------------------------------------------------
# Numba CPU: x as (B*T, NH, hs) C-contiguous; sgn (+1 forward, -1 backward) typed as x's dtype.

@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _rope_cpu(x, cos, sin, sgn, interleaved, out):  # (BT,NH,hs), (T,h) x2, scalar, bool, (BT,NH,hs)
    BT, NH, hs = x.shape
    T = cos.shape[0]
    h = hs // 2
    for u in prange(BT):
        t = u % T
        for hd in range(NH):
            if interleaved:
                for i in range(h):
                    a = x[u, hd, 2 * i]
                    b = x[u, hd, 2 * i + 1]
                    si = sgn * sin[t, i]
                    out[u, hd, 2 * i] = a * cos[t, i] - b * si
                    out[u, hd, 2 * i + 1] = b * cos[t, i] + a * si
            else:
                for i in range(h):
                    a = x[u, hd, i]
                    b = x[u, hd, h + i]
                    si = sgn * sin[t, i]
                    out[u, hd, i] = a * cos[t, i] - b * si
                    out[u, hd, h + i] = b * cos[t, i] + a * si


def _check(x, cos, sin):
    B, T, NH, hs = x.shape
    if hs % 2 or cos.shape != (T, hs // 2) or sin.shape != (T, hs // 2):
        raise ValueError(f"rope: x {x.shape} needs an even head size and cos, sin of shape "
                         f"({T}, {hs // 2}), got {cos.shape}, {sin.shape}")


def _rope_cpu_call(x, cos, sin, interleaved, sgn):
    _check(x, cos, sin)
    B, T, NH, hs = x.shape
    x = np.ascontiguousarray(x)  # the kernel reads C-contiguous rows; no copy if x already is
    out = np.empty_like(x)
    dt = x.dtype
    _rope_cpu(x.reshape(B * T, NH, hs), np.ascontiguousarray(cos, dtype=dt),
              np.ascontiguousarray(sin, dtype=dt), dt.type(sgn), bool(interleaved),
              out.reshape(B * T, NH, hs))
    return out


@register("rope_fwd", "cpu")
def rope_fwd_cpu(x, cos, sin, interleaved):
    return _rope_cpu_call(x, cos, sin, interleaved, 1)


@register("rope_bwd", "cpu")
def rope_bwd_cpu(dout, cos, sin, interleaved):
    return _rope_cpu_call(dout, cos, sin, interleaved, -1)


# ---------------------------------------------------------------------------------------------
# GPU: one thread per (row, head, pair) on the flat arrays, grid-stride; adjacent threads take
# adjacent pairs, so the half-split reads are coalesced (interleaved ones are two-float strides).

def _rope_gpu_kernel(x, cos, sin, sgn, interleaved, T, NH, hs, out):  # flat x, out; (T, hs/2) x2
    h = hs // 2
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for u in range(start, x.size // 2, stride):
        i = u % h
        row = u // h  # (b*T + t) * NH + head
        t = (row // NH) % T
        if interleaved:
            ia = row * hs + 2 * i
            ib = ia + 1
        else:
            ia = row * hs + i
            ib = ia + h
        a = x[ia]
        b = x[ib]
        c = cos[t, i]
        s = sgn * sin[t, i]
        out[ia] = a * c - b * s
        out[ib] = b * c + a * s


_GPU = {}


def _gpu():
    if not _GPU:
        cu = load_cuda(globals())
        _GPU["rope"] = cu.jit(_rope_gpu_kernel)
    return _GPU


def _rope_gpu_call(x, cos, sin, interleaved, sgn):
    _check(x, cos, sin)
    xp = array_module(x)
    B, T, NH, hs = x.shape
    x = xp.ascontiguousarray(x)
    out = xp.empty_like(x)
    if x.size:
        blocks, threads = launch_1d(x.size // 2)
        _gpu()["rope"][min(blocks, 4096), threads](
            x.ravel(), xp.ascontiguousarray(cos, dtype=x.dtype), xp.ascontiguousarray(sin, dtype=x.dtype),
            x.dtype.type(sgn), bool(interleaved), T, NH, hs, out.ravel())
    return out


@register("rope_fwd", "gpu")
def rope_fwd_gpu(x, cos, sin, interleaved):
    return _rope_gpu_call(x, cos, sin, interleaved, 1)


@register("rope_bwd", "gpu")
def rope_bwd_gpu(dout, cos, sin, interleaved):
    return _rope_gpu_call(dout, cos, sin, interleaved, -1)


def gpu_kernels_for_ptx():
    """(name, python function, float32 signature) of each GPU kernel, for compile_ptx checks."""
    from numba import boolean, float32, int64, void
    load_cuda(globals())
    v, m = float32[::1], float32[:, ::1]
    return [("rope", _rope_gpu_kernel, void(v, m, m, float32, boolean, int64, int64, int64, v))]


VARIANTS = {
    "rope_fwd": {"ref": rope_fwd_ref, "cpu": rope_fwd_cpu, "gpu": rope_fwd_gpu},
    "rope_bwd": {"ref": rope_bwd_ref, "cpu": rope_bwd_cpu, "gpu": rope_bwd_gpu},
}


if __name__ == "__main__":
    import sys
    inter = "--interleaved" in sys.argv
    B, T, NH, hs = 8, 256, 6, 64  # the q of a B=8, T=256, d=384 model (kernels/attention.py)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((B, T, NH, hs)).astype(np.float32)
    ds = rng.standard_normal((B, T, NH, hs)).astype(np.float32)
    cs, sn = rope_tables(hs, np.arange(T))
    main_check(VARIANTS, {
        "rope_fwd": (lambda xp: (xp.asarray(xs), xp.asarray(cs), xp.asarray(sn), inter), ()),
        "rope_bwd": (lambda xp: (xp.asarray(ds), xp.asarray(cs), xp.asarray(sn), inter), ()),
    })
