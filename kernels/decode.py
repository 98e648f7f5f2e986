"""One decoding step of a whole transformer block, fused: the KV-cache generation fast path.

A new token per row (B rows, T = 1) through one block is a few thousand scalar operations and
a handful of one-row products (GEMVs) that read the block's weights once: at config M (C=384)
about 7 MB of weights per GPT block, ~0.3-0.5 ms at memory bandwidth. Run as the general
block code runs it (a Tensor and a Function per op, a kernel launch per op, each a parallel
region) the step cost 30+ calls per block, and their overhead, not the products, set the
speed. Here one call per block does all of it:

GPT block (``gpt_block``), x (B, C) the residual stream of the new tokens at positions pos (B,):
    h = layer_norm(x; ln_1)                       (serial: B rows of C)
    qkv = h @ W_qkv + b_qkv                        (GEMV / small GEMM, columns split over threads)
    K[b, :, pos[b]] = k, V[b, :, pos[b]] = v       (the cache append)
    a = softmax(scale q K[:, :pos+1]^T) V           (per (row, head), over threads)
    x += a @ W_o + b_o                             (GEMV with beta = 1 into x)
    h = layer_norm(x; ln_2);  u = gelu(h @ W_fc + b_fc)   (bias and GELU on each thread's columns)
    x += u @ W_p + b_p
Llama block (``llama_block``): RMSNorm instead of LayerNorm, q, k, v from three (out, in)
projections, RoPE on q and k at each row's position (tables cos, sin (block_size, hs/2)),
grouped-query attention (query head h reads kv head h // G), ``x += swiglu(h W_g^T, h W_u^T)
W_d^T``. The head (``head``): logits = norm(x) @ W^T, W (V, C), one GEMV split over threads.

The math is each op's, in the order the general path runs them (kernels/layernorm.py,
rmsnorm.py, gelu.py (``ftanh``), swiglu.py (``fexp``), rope.py, attention_decode.py): only
summation orders differ (BLAS vs BLAS, and the attention's dot products), so the step equals
the general path to float32 rounding (tests/test_decode.py checks both models, GQA, MHA, a
tied head, rows at different positions, batch 1 and 3, float32 and float64).

Variants: "ref" (NumPy, composing each op's NumPy reference) and "cpu" (one Numba kernel per
block; the products are OpenBLAS's single-threaded GEMV (one row) or GEMM (several rows) on a
block of output columns per Numba thread, called from inside the kernel as kernels/_blas.py
allows, so nothing runs on OpenBLAS's own pool). No "gpu" variant, and no registry entry: on
the GPU (and under ``TINYLM_KERNELS=gpu``) the block runs the general path, which composes the
existing GPU kernels (matmul via cuBLAS, layernorm/rmsnorm/gelu/swiglu/rope kernels and the
CuPy attention_decode), because there the per-op cost is a kernel launch each, not Python and
Numba region overhead on two cores, and a fused block kernel would need its own GEMV. The
model code picks the variant (tinylm/models/decode.py): "ref" under ``TINYLM_KERNELS=ref``,
"cpu" otherwise; "cpu" falls back to "ref" when no OpenBLAS GEMV/GEMM is found.

Shapes: B rows, C n_embd, NH heads, NKV kv heads, hs = C / NH, L = max_len of the cache,
F the MLP's hidden width. K, V (B, NKV, L, hs) (the cache's arrays of this layer). Weights
as the modules hold them: GPT linears (in, out), Llama projections (out, in).

Leaves out: T > 1 (a prompt's prefill runs the general path: it is GEMMs, not overhead), a
backward (generation only), 16-bit weights (the general path converts them per op), LoRA
adapters (the model checks every projection is a plain Linear).

Version log (benchmarks/train_step.py --only-gen: config M, 16-token prompt + 200 new, greedy,
tokens/s; batch 8 counts the 8 rows' tokens; "as-is" = OPENBLAS_CORETYPE=Haswell set, "unset"
= the AVX-512 kernels; the 2 cores shared with other jobs):
  see tinylm/models/decode.py's version log (the before/after numbers of the whole step).
"""
from __future__ import annotations

import math
import time

import numpy as np
from numba import get_num_threads, njit, prange, set_num_threads, typeof

from kernels._blas import blas_single_threaded, gemm_for, gemv_for
from kernels._common import FASTMATH
from kernels._mathfn import fexp, ftanh
from kernels.attention_decode import attention_decode_ref
from kernels.gelu import GELU_K, GELU_S, gelu_fwd_ref
from kernels.layernorm import layernorm_fwd_ref
from kernels.rmsnorm import rmsnorm_fwd_ref
from kernels.rope import rope_fwd_ref
from kernels.swiglu import swiglu_fwd_ref


# ---- NumPy references ------------------------------------------------------------------------
def _store(K, V, k, v, pos):  # k, v (B, NKV, hs) at positions pos (B,)
    for b in range(k.shape[0]):
        K[b, :, pos[b]] = k[b]
        V[b, :, pos[b]] = v[b]


def _attend_ref(q, K, V, pos):  # q (B, NH, hs) -> (B, NH * hs); each row over its own pos + 1 keys
    B, NH, hs = q.shape
    L = int(pos.max()) + 1
    start = pos if (pos != pos[0]).any() else int(pos[0])
    y = attention_decode_ref(q[:, :, None, :], K[:, :, :L], V[:, :, :L], start)  # (B, NH, 1, hs)
    return y.reshape(B, NH * hs)


def gpt_block_ref(x, pos, p, K, V, eps, work=None):
    """One GPT block for one new token per row: x (B, C), pos (B,) int -> the new x (B, C);
    writes the new keys and values into K, V (B, NH, L, hs) at pos. p = (ln1_w, ln1_b, W_qkv,
    b_qkv, W_o, b_o, ln2_w, ln2_b, W_fc, b_fc, W_p, b_p), linears (in, out)."""
    ln1w, ln1b, wqkv, bqkv, wo, bo, ln2w, ln2b, wfc, bfc, wp, bp = p
    B, C = x.shape
    NH, hs = K.shape[1], K.shape[3]
    qkv = layernorm_fwd_ref(x, ln1w, ln1b, eps)[0] @ wqkv + bqkv
    q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(B, NH, hs) for i in range(3))
    _store(K, V, k, v, pos)
    x = x + (_attend_ref(q, K, V, pos) @ wo + bo)
    u = gelu_fwd_ref(layernorm_fwd_ref(x, ln2w, ln2b, eps)[0] @ wfc + bfc)
    return x + (u @ wp + bp)


def llama_block_ref(x, pos, p, K, V, cos, sin, interleaved, eps, work=None):
    """One Llama block for one new token per row: x (B, C), pos (B,) -> the new x; writes k, v
    (after RoPE) into K, V (B, NKV, L, hs). p = (in_norm_w, W_q, W_k, W_v, W_o, post_norm_w,
    W_gate, W_up, W_down), projections (out, in); cos, sin (>= max pos + 1, hs/2)."""
    n1, wq, wk, wv, wo, n2, wg, wu, wd = p
    B, C = x.shape
    NKV, hs = K.shape[1], K.shape[3]
    NH = wq.shape[0] // hs
    h = rmsnorm_fwd_ref(x, n1, eps)[0]
    c, s = cos[pos], sin[pos]  # (B, hs/2): row b's position, as a B-token sequence
    q = rope_fwd_ref((h @ wq.T).reshape(1, B, NH, hs), c, s, interleaved).reshape(B, NH, hs)
    k = rope_fwd_ref((h @ wk.T).reshape(1, B, NKV, hs), c, s, interleaved).reshape(B, NKV, hs)
    _store(K, V, k, (h @ wv.T).reshape(B, NKV, hs), pos)
    x = x + _attend_ref(q, K, V, pos) @ wo.T
    h = rmsnorm_fwd_ref(x, n2, eps)[0]
    return x + swiglu_fwd_ref(h @ wg.T, h @ wu.T) @ wd.T


def head_ref(x, w, b, eps, W, rms, work=None):
    """logits (B, V) = norm(x) @ W^T, W (V, C); the norm is RMSNorm (w, eps) when ``rms``, else
    LayerNorm (w, b, eps)."""
    h = rmsnorm_fwd_ref(x, w, eps)[0] if rms else layernorm_fwd_ref(x, w, b, eps)[0]
    return h @ W.T


# ---- Numba CPU -------------------------------------------------------------------------------
# Parfor fusion off: Numba fuses consecutive prange loops of equal length when it sees no
# dependency between them, and it cannot see one through a BLAS call's pointers. Fused, the MLP's
# second product (every thread reads all of u) ran in the same loop as the first (each thread
# writes its columns of u): a race, measured as wrong columns on the second thread.
# The helpers are plain @njit functions, not inline="always": inlined into a prange body (Numba
# IR inlining, before the parfor pass), the second chunk of the last product read its input
# before the previous loop had written it (NaN-poisoned scratch came out in its columns).
_PARALLEL = {"fusion": False}

# Products: y[:, j0:j1] (+)= X @ op(W)[:, j0:j1] for one block of output columns per thread.
# in_out: W (K, N) row-major, y = X W;  out_in: W (N, K), y = X W^T. One row: GEMV (no packing
# of W); several rows: GEMM (W read once for all of them). CBLAS constants: 101 row-major,
# 111 no transpose, 112 transpose.

@njit(cache=True)
def _product(gemv, gemm, X, W, Y, j0, j1, one, bt, out_in, isz):  # one, bt: scalars of X's dtype
    Bn, Kd = X.shape
    N = W.shape[0] if out_in else W.shape[1]  # columns of op(W)
    lx, ly = X.strides[0] // isz, Y.strides[0] // isz  # row strides (Y may be a column slice)
    n = j1 - j0
    if n <= 0:
        return
    yp = Y.ctypes.data + j0 * isz
    if out_in:
        wp = W.ctypes.data + j0 * Kd * isz
        if Bn == 1:
            gemv(101, 111, n, Kd, one, wp, Kd, X.ctypes.data, 1, bt, yp, 1)
        else:
            gemm(101, 111, 112, Bn, n, Kd, one, X.ctypes.data, lx, wp, Kd, bt, yp, ly)
    else:
        wp = W.ctypes.data + j0 * isz
        if Bn == 1:
            gemv(101, 112, Kd, n, one, wp, N, X.ctypes.data, 1, bt, yp, 1)
        else:
            gemm(101, 111, 111, Bn, n, Kd, one, X.ctypes.data, lx, wp, N, bt, yp, ly)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _layernorm_rows(x, w, b, eps, out):  # as kernels/layernorm.py's _ln_fwd_cpu, one row at a time
    B, C = x.shape
    for n in range(B):
        xr = x[n]
        s = xr[0] * 0
        for c in range(C):
            s += xr[c]
        mu = s / C
        s2 = xr[0] * 0
        for c in range(C):
            d = xr[c] - mu
            s2 += d * d
        r = 1 / np.sqrt(s2 / C + eps)
        orow = out[n]
        for c in range(C):
            orow[c] = (xr[c] - mu) * r * w[c] + b[c]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _rmsnorm_rows(x, w, eps, out):  # as kernels/rmsnorm.py's _rms_fwd_cpu
    B, C = x.shape
    for n in range(B):
        xr = x[n]
        s = xr[0] * 0
        for c in range(C):
            s += xr[c] * xr[c]
        r = 1 / np.sqrt(s / C + eps)
        orow = out[n]
        for c in range(C):
            orow[c] = xr[c] * r * w[c]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _attend_one(q, Kh, Vh, L, scale, sc, out):
    """out (hs,) = softmax(scale q Kh[:L]^T) Vh[:L] for one query head; sc (>= L,) scratch."""
    hs = q.shape[0]
    m = -np.inf
    for t in range(L):
        s = q[0] * 0
        kt = Kh[t]
        for d in range(hs):
            s += q[d] * kt[d]
        s *= scale
        sc[t] = s
        if s > m:
            m = s
    tot = q[0] * 0
    for t in range(L):
        e = fexp(sc[t] - m)
        sc[t] = e
        tot += e
    for d in range(hs):
        out[d] = 0
    for t in range(L):
        wt = sc[t]
        vt = Vh[t]
        for d in range(hs):
            out[d] += wt * vt[d]
    inv = 1 / tot
    for d in range(hs):
        out[d] *= inv


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=_PARALLEL)
def _gpt_block_cpu(gemv, gemm, x, pos, ln1w, ln1b, wqkv, bqkv, wo, bo, ln2w, ln2b, wfc, bfc, wp, bp,
                   K, V, eps, scale, gs, gk, one, zero, nchunk, h, qkv, att, hid, sc):
    B, C = x.shape
    NH, hs = K.shape[1], K.shape[3]
    C3, F = qkv.shape[1], hid.shape[1]
    isz = x.itemsize
    half = one / (one + one)
    _layernorm_rows(x, ln1w, ln1b, eps, h)
    for c in prange(nchunk):  # qkv = h W_qkv + b
        j0, j1 = C3 * c // nchunk, C3 * (c + 1) // nchunk
        _product(gemv, gemm, h, wqkv, qkv, j0, j1, one, zero, False, isz)
        for b in range(B):
            for j in range(j0, j1):
                qkv[b, j] += bqkv[j]
    for i in prange(B * NH):  # store k, v at pos; attend over positions 0..pos
        b, hd = i // NH, i % NH
        p = pos[b]
        o = hd * hs
        for d in range(hs):
            K[b, hd, p, d] = qkv[b, C + o + d]
            V[b, hd, p, d] = qkv[b, 2 * C + o + d]
        _attend_one(qkv[b, o:o + hs], K[b, hd], V[b, hd], p + 1, scale, sc[i], att[b, o:o + hs])
    for c in prange(nchunk):  # x += a W_o + b_o
        j0, j1 = C * c // nchunk, C * (c + 1) // nchunk
        _product(gemv, gemm, att, wo, x, j0, j1, one, one, False, isz)
        for b in range(B):
            for j in range(j0, j1):
                x[b, j] += bo[j]
    _layernorm_rows(x, ln2w, ln2b, eps, h)
    for c in prange(nchunk):  # u = gelu(h W_fc + b_fc), each thread on its own columns
        j0, j1 = F * c // nchunk, F * (c + 1) // nchunk
        _product(gemv, gemm, h, wfc, hid, j0, j1, one, zero, False, isz)
        for b in range(B):
            for j in range(j0, j1):
                xi = hid[b, j] + bfc[j]
                t = ftanh(gs * (xi + gk * xi * xi * xi))
                hid[b, j] = half * xi * (one + t)
    for c in prange(nchunk):  # x += u W_p + b_p
        j0, j1 = C * c // nchunk, C * (c + 1) // nchunk
        _product(gemv, gemm, hid, wp, x, j0, j1, one, one, False, isz)
        for b in range(B):
            for j in range(j0, j1):
                x[b, j] += bp[j]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=_PARALLEL)
def _llama_block_cpu(gemv, gemm, x, pos, n1, wq, wk, wv, wo, n2, wg, wu, wd, K, V, cos, sin,
                     interleaved, eps, scale, one, zero, nchunk, h, q, kv, att, g, u, sc):
    B, C = x.shape
    NKV, hs = K.shape[1], K.shape[3]
    NQ, NK, F = q.shape[1], kv.shape[1] // 2, g.shape[1]
    NH = NQ // hs
    G = NH // NKV
    hh = hs // 2
    isz = x.itemsize
    _rmsnorm_rows(x, n1, eps, h)
    for c in prange(nchunk):  # q = h W_q^T; k, v = h W_k^T, h W_v^T (into kv[:, :NK], kv[:, NK:])
        _product(gemv, gemm, h, wq, q, NQ * c // nchunk, NQ * (c + 1) // nchunk, one, zero, True, isz)
        j0, j1 = 2 * NK * c // nchunk, 2 * NK * (c + 1) // nchunk
        if j0 < NK:  # this thread's share of the (k, v) outputs, as rows of W_k then W_v
            _product(gemv, gemm, h, wk, kv, j0, min(j1, NK), one, zero, True, isz)
        if j1 > NK:
            _product(gemv, gemm, h, wv, kv[:, NK:], max(j0, NK) - NK, j1 - NK, one, zero, True, isz)
    for i in prange(B * NKV):  # RoPE k, store k, v; then RoPE and attend each of its G query heads
        b, kh = i // NKV, i % NKV
        p = pos[b]
        Kr, Vr = K[b, kh, p], V[b, kh, p]
        o = kh * hs
        for j in range(hh):
            c, s = cos[p, j], sin[p, j]
            if interleaved:
                a0, a1 = kv[b, o + 2 * j], kv[b, o + 2 * j + 1]
                Kr[2 * j], Kr[2 * j + 1] = a0 * c - a1 * s, a1 * c + a0 * s
            else:
                a0, a1 = kv[b, o + j], kv[b, o + hh + j]
                Kr[j], Kr[hh + j] = a0 * c - a1 * s, a1 * c + a0 * s
        for d in range(hs):
            Vr[d] = kv[b, NK + o + d]
        for gi in range(G):
            qo = (kh * G + gi) * hs
            qr = q[b, qo:qo + hs]
            for j in range(hh):
                c, s = cos[p, j], sin[p, j]
                if interleaved:
                    a0, a1 = qr[2 * j], qr[2 * j + 1]
                    qr[2 * j], qr[2 * j + 1] = a0 * c - a1 * s, a1 * c + a0 * s
                else:
                    a0, a1 = qr[j], qr[hh + j]
                    qr[j], qr[hh + j] = a0 * c - a1 * s, a1 * c + a0 * s
            _attend_one(qr, K[b, kh], V[b, kh], p + 1, scale, sc[i * G + gi], att[b, qo:qo + hs])
    for c in prange(nchunk):  # x += a W_o^T
        _product(gemv, gemm, att, wo, x, C * c // nchunk, C * (c + 1) // nchunk, one, one, True, isz)
    _rmsnorm_rows(x, n2, eps, h)
    for c in prange(nchunk):  # g = swiglu(h W_gate^T, h W_up^T) on each thread's columns
        j0, j1 = F * c // nchunk, F * (c + 1) // nchunk
        _product(gemv, gemm, h, wg, g, j0, j1, one, zero, True, isz)
        _product(gemv, gemm, h, wu, u, j0, j1, one, zero, True, isz)
        for b in range(B):
            for j in range(j0, j1):
                a = g[b, j]
                g[b, j] = a * (one / (one + fexp(-a))) * u[b, j]
    for c in prange(nchunk):  # x += g W_down^T
        _product(gemv, gemm, g, wd, x, C * c // nchunk, C * (c + 1) // nchunk, one, one, True, isz)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=_PARALLEL)
def _head_cpu(gemv, gemm, x, w, b, eps, W, rms, one, zero, nchunk, h, out):
    Vn = out.shape[1]
    if rms:
        _rmsnorm_rows(x, w, eps, h)
    else:
        _layernorm_rows(x, w, b, eps, h)
    for c in prange(nchunk):
        _product(gemv, gemm, h, W, out, Vn * c // nchunk, Vn * (c + 1) // nchunk, one, zero, True, x.itemsize)


def _buf(work, name, shape, dtype):
    """A scratch array kept in ``work`` (the KV cache's dict) between steps: no allocation per
    token. None for ``work`` allocates a fresh one."""
    if work is None:
        return np.empty(shape, dtype)
    key = (name, shape, np.dtype(dtype).str)
    a = work.get(key)
    if a is None:
        a = work[key] = np.empty(shape, dtype)
    return a


def _blas(dtype):
    gemv, gemm = gemv_for(dtype), gemm_for(dtype)
    return None if gemv is None or gemm is None else (gemv, gemm)


def _c(a):
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


class _Runner:
    """Calls one compiled kernel for the step, two ways round the costs measured here.

    Dispatch: Numba's dispatcher resolves a call with ctypes function arguments (the BLAS
    pointers) on its slow path, typing every argument in Python: 0.9 ms per call for this
    kernel's 30 arguments, 11.7 us through the compiled overload's ``entry_point``, which is
    what is called here (looked up once per dtype; every array is passed C-contiguous, so the
    signature is fixed by the dtype).

    Threads: on these 2 shared cores a parallel region waits for every worker, and with other
    jobs running a worker can wait a scheduler tick per region: one GPT block at config M took
    0.21-0.44 ms on 2 threads when the cores were free and 56-79 ms under load (load average
    7-11), against 0.25-0.39 ms on one thread in both. So the runner times every call and uses
    the faster of one thread and all of Numba's: it starts on one, tries all now and then, and
    waits twice as long before the next try each time the try loses (up to every 4,096 calls).
    The products are cut into the same ``nchunk`` column blocks either way (Numba's configured
    thread count), so the two give identical results: the choice changes the speed only.
    """

    def __init__(self, kernel):
        self.kernel, self.entry, self.state = kernel, {}, {}

    def __call__(self, key, args):
        ep = self.entry.get(key[0])
        if ep is None:
            ep = self.entry[key[0]] = self.kernel.compile(tuple(typeof(a) for a in args))
        n = get_num_threads()
        if n == 1:
            ep(*args)
            return
        st = self.state.get(key)
        if st is None:  # [threads now, calls, next try, interval, {threads: mean seconds}]
            st = self.state[key] = [1, 0, 4, 4, {}]
        try_other = st[1] >= st[2]
        use = (n if st[0] == 1 else 1) if try_other else st[0]
        if use != n:
            set_num_threads(use)
        t = time.perf_counter()
        try:
            ep(*args)
        finally:
            dt = time.perf_counter() - t
            if use != n:
                set_num_threads(n)
        mean = st[4]
        # the mode in use: a running mean; a try: its own time alone (a stale mean of the other mode,
        # e.g. one with a slow first call in it, kept the runner on a mode 20x slower than the other)
        mean[use] = dt if try_other or use not in mean else 0.7 * mean[use] + 0.3 * dt
        st[1] += 1
        if try_other:
            if mean[use] < mean.get(st[0], np.inf):
                st[0], st[3] = use, 4
            else:
                st[3] = min(2 * st[3], 4096)
            st[2] = st[1] + st[3]


_run_gpt, _run_llama, _run_head = _Runner(_gpt_block_cpu), _Runner(_llama_block_cpu), _Runner(_head_cpu)


def gpt_block_cpu(x, pos, p, K, V, eps, work=None):
    """As gpt_block_ref; x is updated in place and returned."""
    blas = _blas(x.dtype)
    if blas is None or not (K.flags.c_contiguous and V.flags.c_contiguous):
        return gpt_block_ref(x, pos, p, K, V, eps)
    x, pos, p = _c(x), _c(np.asarray(pos, np.int64)), tuple(_c(a) for a in p)
    B, C = x.shape
    NH, L, hs = K.shape[1], K.shape[2], K.shape[3]
    dt = x.dtype
    F = p[8].shape[1]
    h, qkv, att = _buf(work, "h", (B, C), dt), _buf(work, "qkv", (B, 3 * C), dt), _buf(work, "att", (B, C), dt)
    hid, sc = _buf(work, "hid", (B, F), dt), _buf(work, "sc", (B * NH, L), dt)
    with blas_single_threaded():
        _run_gpt((dt.str, B), (*blas, x, pos, *p, K, V, dt.type(eps), dt.type(1.0 / math.sqrt(hs)), dt.type(GELU_S),
                               dt.type(GELU_K), dt.type(1), dt.type(0), get_num_threads(), h, qkv, att, hid, sc))
    return x


def llama_block_cpu(x, pos, p, K, V, cos, sin, interleaved, eps, work=None):
    """As llama_block_ref; x is updated in place and returned."""
    blas = _blas(x.dtype)
    if blas is None or not (K.flags.c_contiguous and V.flags.c_contiguous):
        return llama_block_ref(x, pos, p, K, V, cos, sin, interleaved, eps)
    x, pos, p = _c(x), _c(np.asarray(pos, np.int64)), tuple(_c(a) for a in p)
    cos, sin = _c(cos), _c(sin)
    B, C = x.shape
    NKV, L, hs = K.shape[1], K.shape[2], K.shape[3]
    dt = x.dtype
    NQ, F = p[1].shape[0], p[6].shape[0]
    h, q = _buf(work, "h", (B, C), dt), _buf(work, "q", (B, NQ), dt)
    kv, att = _buf(work, "kv", (B, 2 * NKV * hs), dt), _buf(work, "att", (B, NQ), dt)
    g, u = _buf(work, "g", (B, F), dt), _buf(work, "u", (B, F), dt)
    sc = _buf(work, "sc", (B * (NQ // hs), L), dt)
    with blas_single_threaded():
        _run_llama((dt.str, B), (*blas, x, pos, *p, K, V, cos, sin, bool(interleaved), dt.type(eps),
                                 dt.type(1.0 / math.sqrt(hs)), dt.type(1), dt.type(0), get_num_threads(),
                                 h, q, kv, att, g, u, sc))
    return x


def head_cpu(x, w, b, eps, W, rms, work=None):
    """As head_ref; returns a fresh (B, V) array (the caller keeps it)."""
    blas = _blas(x.dtype)
    if blas is None:
        return head_ref(x, w, b, eps, W, rms)
    x, w, W = _c(x), _c(w), _c(W)
    b = w if b is None else _c(b)
    B, C = x.shape
    dt = x.dtype
    out = np.empty((B, W.shape[0]), dt)
    h = _buf(work, "h", (B, C), dt)
    with blas_single_threaded():
        _run_head((dt.str, B), (*blas, x, w, b, dt.type(eps), W, bool(rms), dt.type(1), dt.type(0),
                                get_num_threads(), h, out))
    return out


VARIANTS = {
    "gpt_block": {"ref": gpt_block_ref, "cpu": gpt_block_cpu},
    "llama_block": {"ref": llama_block_ref, "cpu": llama_block_cpu},
    "head": {"ref": head_ref, "cpu": head_cpu},
}
