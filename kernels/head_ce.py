"""LM head + cross-entropy fused: loss of (x @ w^T) against targets, the (N, V) logits never whole.

Math (row n: x_n (C,), targets t_n; w (V, C); logits z_n = w x_n (V,)):
    lse_n  = m + log(sum_j exp(z_nj - m)),  m = max_j z_nj
    loss_n = lse_n - z_n,t_n                        (0 where t_n == ignore_index)
    the objective is L = sum_n scale_n * loss_n: one scale for every row (the mean
    cross-entropy passes 1 / n_valid), or a scale per row (N,) (a sequence log-prob's backward
    passes each token its sequence's incoming gradient: tinylm/posttrain/logprobs.py), so
    dz_n   = scale_n * (softmax(z_n) - onehot(t_n))   (0 where t_n == ignore_index)
    dx     = dz @ w   (N, C),   dw = dz^T @ x   (V, C)
Shapes: N rows (B*T), C channels, V vocabulary. x (N, C), w (V, C), targets (N,) int64;
scale a number or (N,); outputs loss_rows, lse (N,), dx (N, C) or None, dw (V, C) or None;
with ``dw_from`` = k > 0, dw is (V - k, C): the gradient of rows k.. only (a vocabulary grown
for chat tokens whose old rows are frozen: tinylm/posttrain/lora.py's join_rows).

One op, ``head_ce(x, w, targets, ignore_index, scale, want_dx, want_dw, dw_from=0)``: the forward *and* the
gradients, computed row chunk by row chunk in one sweep, so a chunk's logits (at most ROWS x V)
are the only logits that ever exist. The gradient is linear in the loss's incoming gradient
(dout, a scalar: 1, or a loss scale, or 1/accumulation steps), so the autograd op
(tinylm.functional.HeadCrossEntropy) keeps dx and dw from this sweep and its backward only
multiplies them by dout. Why not the textbook split (forward keeps lse, backward recomputes each
chunk's logits): that costs a fourth (N, C, V) GEMM per step, the largest product in the model
(version log v1: +33% of the head's GEMM time, 6.4 GFLOP at M, 79 at L), where keeping dw
costs one (V, C) array between forward and backward, smaller than the (N, V) logits it replaces
whenever N > C (M: 12.6 MB against 67 MB of logits and 67 more of their gradient; L: 155 MB
against 206 + 206). ``want_dx`` / ``want_dw`` False (evaluation, a frozen head) skip that work.
Ignored rows: lse is reported 0 for them (their logits are never computed on the CPU path).
A 16-bit w (bf16 bits in uint16, or float16: a mixed-precision run's working copy) with float32
x: on the CPU each thread decodes the vocabulary block it is about to multiply into its own
(VB, C) float32 scratch (``_w_block``), in both passes, so no float32 copy of the (V, C) weight
is made (at L, 154 MB at the step's peak); the other variants get it decoded whole
(tinylm.functional.HeadCrossEntropy).

CPU ("cpu"): the rows with a target (ignored ones dropped first: SFT masks whole prompts) are cut
into chunks of ROWS rows; for each chunk the vocabulary is cut into blocks of VB columns, a
contiguous range of blocks per Numba thread. A thread, for each of its blocks: one
single-threaded BLAS GEMM z = x_chunk @ w_block^T into the chunk buffer (kernels/_blas.py;
OpenBLAS's own pool held at one thread, as kernels/matmul.py), then the block's per-row max and
sum of exp while the block is in L2 (the online-softmax combination: partial (m_b, s_b) per
block, lse = M + log sum_b s_b exp(m_b - M)). After the per-row combination a second parallel
pass, same blocks: z -> scale (exp(z - lse) - onehot) in place, dw_block += dz_block^T x_chunk
(each thread owns its blocks' rows of dw: no race, no reduction) and dx_partial += dz_block
w_block (one (ROWS, C) partial per thread, summed after). fexp (kernels/_mathfn.py) for exp.
GPU ("gpu"): per chunk, cuBLAS products (CuPy matmul) around kernels/cross_entropy.py's GPU
kernels (forward, then the backward kernel writes dz), dx and dw as two more products.

Leaves out: label smoothing, z-loss, logit soft-capping, a bias on the head.
References: the chunked/fused linear cross-entropy of Liger-Kernel (FusedLinearCrossEntropy)
and Wijmans et al. 2024 "Cut Your Losses in Large-Vocabulary Language Models" for the idea;
Milakov & Gimelshein 2018 for the online softmax combination. Written from the math above.

Version log (python -m kernels.head_ce: N=2048, C=384, V=8192 float32, 2 threads, the fused op
against the unfused kernels in the same process; step times from benchmarks/train_step.py):
  v1 cpu: row chunks of ROWS=256, vocabulary blocks of VB=1024 per thread, BLAS GEMMs from
     Numba, gradients in the forward sweep (no recompute). Correct against the reference and
     the unfused composition (tests/test_head_ce.py).
     Measured (python -m kernels.head_ce 128,256,512; 2026-12-07 03:48 UTC) with the 2 cores at
     a load average of ~11 (other jobs' benchmarks and test suites: every figure ~30x a quiet
     machine's, one head GEMM took 1,036-1,262 ms against ~32 quiet), the variants alternating
     in one process, 5 rounds, median (min): unfused (matmul, cross_entropy fwd + bwd kernels,
     the dW and dX GEMMs) 7,656 ms (6,033); fused rows=128 4,668 (4,516), rows=256 4,540
     (3,872), rows=512 3,764 (3,399); one head GEMM alone 1,262 (1,035), the product a
     recomputing backward would add (+28% on the fused op). Fused / unfused 0.59 at rows=256.
     ROWS stays 256 until a quiet rerun: 512's lead is inside this noise, and at L (V=50304)
     its chunk of logits would be 103 MB.
     Training step, benchmarks/train_step.py --configs M --llama-configs M --blas-env both
     --no-gen --no-profile, before (7d4892e, --rounds 3, 02:54 UTC) and after (4ed470c, the
     Trainer's return_logits=False path, --rounds 1: the load left no time for 3), each in one
     run, OpenBLAS as-is (Haswell kernels). The 2 cores ran at a load average of 6-12 all along
     (the GEMM ceiling measured 50 GFLOP/s before and 17 after, against 213 quiet; one round
     of the same run moved 3,901 -> 14,720 ms), so the step times and the tinylm/PyTorch time
     ratios below are the load's, not the kernels'; the peak memory is not load-bound:
       before, fastest of 3: M tinylm 3,901 ms/step, PyTorch 7,364 (ratio 1.89); llama-M tinylm
         11,314, PyTorch 8,072 (0.71). Peak RSS / growth MiB: M tinylm 905 / 655, PyTorch
         1,177 / 855; llama-M tinylm 895 / 744, PyTorch 1,321 / 998.
       after, 1 round: M tinylm 12,226 ms/step, PyTorch 13,532 (1.11); llama-M tinylm 18,491,
         PyTorch 52,469 (2.84). Peak RSS / growth MiB: M tinylm 702 / 550, PyTorch 1,154 / 831;
         llama-M tinylm 785 / 633, PyTorch 1,330 / 1,007.
       OPENBLAS_CORETYPE/L2_SIZE unset (the second half of each run; OpenBLAS still reported
         Haswell here): before, the run was stopped for time after M's 3 rounds and llama-M's
         first: M tinylm 5,569 / 12,601 / 6,691 ms/step, PyTorch 16,347 / 14,681 / 38,104;
         llama-M tinylm 20,201, PyTorch 58,981 (no table). After, 1 round: M tinylm 15,901,
         PyTorch 33,745 (2.12), peak RSS / growth 702 / 550 against 1,119 / 796; llama-M tinylm
         22,102, PyTorch 22,789 (1.03), 715 / 563 against 1,288 / 964.
       -> peak RSS M 905 -> 702 MiB (-203; growth -105), llama-M 895 -> 785 (-110; growth
         -111); first losses equal to PyTorch's (difference 0.0e+00) both times. Step time:
         not measurable in these runs; the in-process A/B above (fused 0.59x of unfused for
         the head + loss) is the evidence until a quiet rerun.
  v2 (2026-12-07): a scale per row (DPO's fused sequence log-probs), dw for rows k.. only
     (dw_from: a grown vocabulary's head), and the pool of large buffers (POOL_BYTES).
     Why the pool: at config L the op took 2.0-2.6 s inside a training step against 1.5-1.8 s
     alone on the same weights. Per step the process faulted in ~340 MB of fresh pages (170
     transparent huge pages, /proc/vmstat thp_fault_alloc) for dw (154 MB) and the chunk's
     logits (51 MB) among others, at 0.92-0.98 s of system time per step (getrusage), against
     0.21-0.24 s with NumPy's huge-page advice off (NUMPY_MADVISE_HUGEPAGE=0, 4 KiB faults).
     With the pool: 0.00-0.01 s of system time per step, no page faults. Wall time, L, steady
     state, 5 steps per process, processes alternating (A B A B): medians 5,938 and 6,584
     ms/step without, 6,528 and 5,322 with: this machine's noise is larger than the change, so
     no speed-up is claimed. Peak RSS at L (benchmarks/train_step.py, tinylm only): 2,984 ->
     2,837 MiB, M 702 -> 687 (the CPU path no longer allocates unused zero results first).
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from kernels._common import FASTMATH, array_module, main_check
from kernels._formats import decode_rows
from kernels._mathfn import fexp
from kernels.registry import register

ROWS = 256       # rows per chunk (the chunk's logits: ROWS x V)
VB = 1024        # vocabulary columns per block: ROWS x VB fp32 = 1 MiB, one core's L2
REF_ROWS = 1024  # the reference's chunk (it is a NumPy composition: any size gives the same math)


def _row_scales(xp, scale, N, dtype):
    """The gradient's scale as one per row (N,) of ``dtype``: a number repeated, or an array."""
    if xp.ndim(scale) == 0:
        return xp.full(N, float(scale), dtype=dtype)
    if scale.shape != (N,):
        raise ValueError(f"head_ce: scale must be a number or of shape ({N},), got {scale.shape}")
    return xp.ascontiguousarray(scale, dtype=dtype)


def _empty_results(xp, x, w, want_dx, want_dw, dw_from=0):
    N = x.shape[0]
    return (xp.zeros(N, dtype=x.dtype), xp.zeros(N, dtype=x.dtype),
            xp.zeros_like(x) if want_dx else None, xp.zeros(w[dw_from:].shape, x.dtype) if want_dw else None)


@register("head_ce", "ref")
def head_ce_ref(x, w, targets, ignore_index, scale, want_dx, want_dw, dw_from=0):
    # (N,C), (V,C), (N,), int, float | (N,), bool, bool, int -> loss (N,), lse (N,), dx (N,C)|None,
    # dw (V-dw_from,C)|None
    xp = array_module(x)
    loss, lse, dx, dw = _empty_results(xp, x, w, want_dx, want_dw, dw_from)
    scale = _row_scales(xp, scale, x.shape[0], x.dtype)
    for r0 in range(0, x.shape[0], REF_ROWS):
        rows = slice(r0, r0 + REF_ROWS)
        xc, t = x[rows], targets[rows]
        z = xc @ w.T  # (R, V): this chunk's logits
        m = z.max(axis=1)
        l = m + xp.log(xp.exp(z - m[:, None]).sum(axis=1))
        valid = t != ignore_index
        n = xp.arange(len(t))
        picked = z[n, xp.where(valid, t, 0)]
        loss[rows] = xp.where(valid, l - picked, 0)
        lse[rows] = xp.where(valid, l, 0)
        if want_dx or want_dw:
            d = xp.exp(z - l[:, None])  # softmax
            d[n[valid], t[valid]] -= 1
            d *= xp.where(valid, scale[rows], 0).astype(x.dtype)[:, None]
            if want_dx:
                dx[rows] = d @ w
            if want_dw:
                dw += d[:, dw_from:].T @ xc
    return loss, lse, dx, dw


# ---------------------------------------------------------------------------------------------
# Numba CPU + BLAS (see the docstring). gemm: the CBLAS ctypes function, an argument so the
# kernel stays cacheable (kernels/_blas.py). Arrays are C-contiguous; Z is the chunk buffer
# (ROWS, V); pm, ps (nblk, ROWS) the blocks' partial max / sum; pz (ROWS,) the target's logit;
# dxp (nthreads, ROWS, C) the per-thread dx partials.

@njit(cache=True, inline="always")
def _w_block(w, w16, kind, ws, th, v0, v1, C, isz):
    """The address of w's rows v0:v1 as float32 for a GEMM: w itself, or (a 16-bit w: a run's
    working copy) those rows decoded into this thread's scratch ws[th] (vb, C)."""
    if kind == 0:
        return w.ctypes.data + v0 * C * isz
    decode_rows(w16[v0:v1], kind, ws[th, :v1 - v0])
    return ws.ctypes.data + th * ws.shape[1] * C * isz


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _head_ce_cpu(gemm, x, w, w16, kind, ws, targets, scale, want_dx, want_dw, dw_from, R, vb, nth,
                 loss, lse, dx, dw, Z, pm, ps, pz, dxp):
    N, C = x.shape
    V = w16.shape[0] if kind else w.shape[0]
    nblk = (V + vb - 1) // vb
    isz = x.itemsize
    zero = x[0, 0] - x[0, 0]  # typed zero and one of x's dtype
    one = zero + 1
    xa0, za, dwa, dxpa = x.ctypes.data, Z.ctypes.data, dw.ctypes.data, dxp.ctypes.data
    for r0 in range(0, N, R):
        nr = min(R, N - r0)
        xa = xa0 + r0 * C * isz
        # pass 1: logits of each block, then its per-row max and sum of exp(z - max)
        for th in prange(nth):
            for b in range(nblk * th // nth, nblk * (th + 1) // nth):
                v0 = b * vb
                v1 = min(V, v0 + vb)
                gemm(101, 111, 112, nr, v1 - v0, C, one, xa, C, _w_block(w, w16, kind, ws, th, v0, v1, C, isz), C,
                     zero, za + v0 * isz, V)
                for r in range(nr):
                    z = Z[r, v0:v1]
                    m = z[0]
                    for j in range(1, v1 - v0):
                        m = max(m, z[j])
                    s = zero
                    for j in range(v1 - v0):
                        s += fexp(z[j] - m)
                    pm[b, r] = m
                    ps[b, r] = s
                    t = targets[r0 + r]
                    if v0 <= t < v1:
                        pz[r] = z[t - v0]
        # combine the blocks: lse = M + log(sum_b s_b exp(m_b - M)), M = max_b m_b
        for r in range(nr):
            M = pm[0, r]
            for b in range(1, nblk):
                M = max(M, pm[b, r])
            s = zero
            for b in range(nblk):
                s += ps[b, r] * fexp(pm[b, r] - M)
            l = M + np.log(s)
            lse[r0 + r] = l
            loss[r0 + r] = l - pz[r]
        if not (want_dx or want_dw):
            continue
        # pass 2: dz = scale (softmax - onehot) in place; dw rows of the block += dz^T x_chunk;
        # this thread's dx partial += dz_block w_block
        for th in prange(nth):
            first = True
            for b in range(nblk * th // nth, nblk * (th + 1) // nth):
                v0 = b * vb
                v1 = min(V, v0 + vb)
                for r in range(nr):
                    z = Z[r, v0:v1]
                    l = lse[r0 + r]
                    sc = scale[r0 + r]
                    for j in range(v1 - v0):
                        z[j] = sc * fexp(z[j] - l)
                    t = targets[r0 + r]
                    if v0 <= t < v1:
                        z[t - v0] -= sc
                a = max(v0, dw_from)  # dw holds rows dw_from.. only
                if want_dw and a < v1:  # dw[a:v1] (+)= dz[:, a:v1]^T x_chunk; overwritten by the first chunk
                    gemm(101, 112, 111, v1 - a, C, nr, one, za + a * isz, V, xa, C,
                         zero if r0 == 0 else one, dwa + (a - dw_from) * C * isz, C)
                if want_dx:
                    gemm(101, 111, 111, nr, C, v1 - v0, one, za + v0 * isz, V,
                         _w_block(w, w16, kind, ws, th, v0, v1, C, isz), C, zero if first else one,
                         dxpa + th * R * C * isz, C)
                first = False
        if want_dx:
            for r in prange(nr):
                for c in range(C):
                    s = dxp[0, r, c]
                    for th in range(1, nth):
                        s += dxp[th, r, c]
                    dx[r0 + r, c] = s


def _new(shape, dtype):
    return np.empty(shape, dtype=dtype)


# Arrays of POOL_BYTES or more (dw, and the chunk's logits at a large vocabulary) are kept for
# the next call, one per shape and dtype: glibc serves each such request with fresh pages (its
# mmap threshold tops out at 32 MiB: tinylm/_malloc.py) that the OS zero-fills on first touch,
# and with NumPy's transparent-huge-page advice each 2 MiB fault cost far more than its zeroing
# on this machine (version log v2). The chunk's logits come back at the end of the call; dw when
# the autograd op that keeps it is freed (``give_back``, tinylm/functional.py).
POOL_BYTES = 32 << 20
_free: dict = {}


def _take(shape, dtype):
    dtype = np.dtype(dtype)
    if int(np.prod(shape)) * dtype.itemsize >= POOL_BYTES:
        got = _free.pop((tuple(shape), dtype.str), None)
        if got is not None:
            return got
    return _new(shape, dtype)


def give_back(a) -> None:
    """Offer an array this module made for reuse by the next call; only once nothing reads it."""
    if isinstance(a, np.ndarray) and a.base is None and a.nbytes >= POOL_BYTES:
        _free[(a.shape, a.dtype.str)] = a


@register("head_ce", "cpu")
def head_ce_cpu(x, w, targets, ignore_index, scale, want_dx, want_dw, dw_from=0, *, rows=None, vb=None):
    from kernels._blas import blas_single_threaded, gemm_for  # noqa: PLC0415
    kind = {np.dtype(np.uint16): 1, np.dtype(np.float16): 2}.get(np.dtype(w.dtype), 0)
    gemm = gemm_for(x.dtype) if (x.dtype == w.dtype or (kind and x.dtype == np.float32)) else None
    if gemm is None:  # no OpenBLAS GEMM to call from Numba (MKL, Accelerate): the reference
        if kind:
            from kernels._formats import to_f32  # noqa: PLC0415

            w = to_f32(w)
        return head_ce_ref(x, w, targets, ignore_index, scale, want_dx, want_dw, dw_from)
    N, C = x.shape
    V = w.shape[0]
    valid = np.flatnonzero(targets != ignore_index)
    if len(valid) == 0 or C == 0:
        return _empty_results(np, x, w, want_dx, want_dw, dw_from)
    every = len(valid) == N
    xv = np.ascontiguousarray(x) if every else x[valid]  # rows with a target only
    tv = np.ascontiguousarray(targets, dtype=np.int64) if every else targets[valid].astype(np.int64)
    sv = _row_scales(np, scale, N, x.dtype)
    sv = sv if every else sv[valid]
    wc = np.ascontiguousarray(w)
    n = len(valid)
    R = min(rows or ROWS, n)
    vb = min(vb or VB, V)
    nblk = (V + vb - 1) // vb
    nth = max(1, min(get_num_threads(), nblk))
    # a 16-bit w (a bf16/fp16 run's working copy): each thread decodes the block it multiplies
    # into its own (vb, C) scratch, so no float32 copy of the whole (V, C) weight is made
    w32, w16 = (np.empty((1, 1), x.dtype), wc.view(np.uint16)) if kind else (wc, np.empty((1, 1), np.uint16))
    ws = np.empty((nth, vb, C) if kind else (1, 1, 1), x.dtype)
    new = _new  # np.empty; tests make it NaN-filled (a loop that did not run leaves NaN)
    lv, lsev = new(n, x.dtype), new(n, x.dtype)
    dxv = new(xv.shape if want_dx else (0, C), x.dtype)
    dwv = _take((V - dw_from, C), x.dtype) if want_dw else new((0, C), x.dtype)
    Z = _take((R, V), x.dtype)
    pm, ps, pz = new((nblk, R), x.dtype), new((nblk, R), x.dtype), new(R, x.dtype)
    dxp = new((nth if want_dx else 1, R, C), x.dtype)
    with blas_single_threaded():
        _head_ce_cpu(gemm, xv, w32, w16, kind, ws, tv, sv, bool(want_dx), bool(want_dw), int(dw_from), R, vb,
                     nth, lv, lsev, dxv, dwv, Z, pm, ps, pz, dxp)
    give_back(Z)
    if every:
        loss, lse = lv, lsev
        dx = dxv if want_dx else None
    else:
        loss, lse = np.zeros(N, dtype=x.dtype), np.zeros(N, dtype=x.dtype)
        loss[valid], lse[valid] = lv, lsev
        dx = None
        if want_dx:
            dx = np.zeros_like(x)
            dx[valid] = dxv
    return loss, lse, dx, (dwv if want_dw else None)


head_ce_cpu.takes_16bit_w = True  # w may be bf16 (uint16) or fp16 with x float32 (tinylm.functional)


# ---------------------------------------------------------------------------------------------
# GPU: per chunk, cuBLAS products around the cross-entropy GPU kernels (kernels/cross_entropy.py).

GPU_ROWS = 4096


@register("head_ce", "gpu")
def head_ce_gpu(x, w, targets, ignore_index, scale, want_dx, want_dw, dw_from=0):
    from kernels.cross_entropy import cross_entropy_bwd_gpu, cross_entropy_fwd_gpu  # noqa: PLC0415
    xp = array_module(x)
    loss, lse, dx, dw = _empty_results(xp, x, w, want_dx, want_dw, dw_from)
    scale = _row_scales(xp, scale, x.shape[0], x.dtype)
    wt = w.T
    for r0 in range(0, x.shape[0], GPU_ROWS):
        rows = slice(r0, r0 + GPU_ROWS)
        xc = xp.ascontiguousarray(x[rows])
        t = xp.ascontiguousarray(targets[rows])
        z = xp.ascontiguousarray(xp.matmul(xc, wt))  # (R, V)
        lr, l = cross_entropy_fwd_gpu(z, t, ignore_index)
        valid = t != ignore_index
        loss[rows] = lr
        lse[rows] = xp.where(valid, l, 0)
        if want_dx or want_dw:
            d = cross_entropy_bwd_gpu(z, t, l, xp.ascontiguousarray(scale[rows]), ignore_index)  # scale (softmax - onehot), 0 if ignored
            if want_dx:
                dx[rows] = xp.matmul(d, w)
            if want_dw:
                dw += xp.matmul(d[:, dw_from:].T, xc)
    return loss, lse, dx, dw


def gpu_kernels_for_ptx():
    """(name, python function, float32 signature) of each GPU kernel, for compile_ptx checks:
    none of its own (cuBLAS, and kernels/cross_entropy.py's kernels, checked there)."""
    return []


VARIANTS = {"head_ce": {"ref": head_ce_ref, "cpu": head_ce_cpu, "gpu": head_ce_gpu}}


if __name__ == "__main__":
    N, C, V = 2048, 384, 8192  # config M: B*T = 8*256 rows, 384 wide, vocabulary 8192
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((N, C)).astype(np.float32)
    ws = (0.02 * rng.standard_normal((V, C))).astype(np.float32)
    ts = rng.integers(0, V, N)
    ts[::7] = -100
    sc = 1.0 / int((ts != -100).sum())
    main_check(VARIANTS, {"head_ce": (lambda xp: (xp.asarray(xs), xp.asarray(ws), xp.asarray(ts), -100, sc,
                                                  True, True), ())})

    # the whole head + loss, forward and gradients, fused against the unfused kernels tinylm ran
    # before (matmul, cross_entropy fwd/bwd, two matmuls), alternating, in this one process
    import sys
    import time

    from kernels.cross_entropy import cross_entropy_bwd_cpu, cross_entropy_fwd_cpu
    from kernels.matmul import matmul_acc_cpu, matmul_cpu

    def unfused():
        z = matmul_cpu(xs, ws.T)
        _, l = cross_entropy_fwd_cpu(z, ts, -100)
        d = cross_entropy_bwd_cpu(z, ts, l, np.full(N, sc, dtype=np.float32), -100)
        dwu = np.zeros_like(ws)
        matmul_acc_cpu(d.T, xs, dwu)
        return matmul_cpu(d, ws), dwu

    rows = [int(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else [ROWS]
    fns = {"unfused": unfused, "one head GEMM": lambda: matmul_cpu(xs, ws.T)}  # the GEMM a recompute adds
    fns |= {f"fused rows={r}": (lambda r=r: head_ce_cpu(xs, ws, ts, -100, sc, True, True, rows=r)) for r in rows}
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(5):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        print(f"{k:16s} median {1e3 * np.median(v):8.1f} ms  min {1e3 * min(v):8.1f} ms")
