"""Causal scaled dot-product self-attention: forward and backward.

Math (per batch b, head h; scale = 1/sqrt(hs)):
    S = scale * Q K^T,  S[t, j] = -inf for j > t (causal mask)
    lse[t] = logsumexp_j S[t, j],  P = exp(S - lse),  out = P V
Backward (recomputes P from lse, never stores it):
    dV = P^T dout,  dP = dout V^T,  D[t] = sum_d dout[t, d] * out[t, d]
    dS = P * (dP - D),  dQ = scale * dS K,  dK = scale * dS^T Q
Shapes: B batch, NH heads, T time, hs head size. q, k, v, out, dout, dq, dk, dv (B, NH, T, hs);
lse (B, NH, T).

Variants:
- "cpu_plain": the textbook algorithm per head: S (T, T) scores, row softmax, P V. Backward
  materialises P and dS (T, T). Extra memory per running head: 2 T^2 floats.
- "cpu_flash": online softmax over key tiles of BC keys (Milakov & Gimelshein; FlashAttention).
  Forward: parallel over (head, query tile of BR rows); per row a running max m, sum l and
  accumulator acc are rescaled by exp(m_old - m_new) when a tile raises the max; key/value tiles
  stay in L1 while the tile's rows pass over them. Backward: parallel over heads; for each key
  tile, every later query row recomputes its scores, P = exp(S - lse), dP = dout V^T and
  dS = P (dP - D), and adds into dq (its own row) and the tile's dk, dv. Extra memory: O(T hs)
  (the K^T and V^T copies) plus O(BR hs) per thread: it grows with T, not T^2.
- "cpu_blas": query tiles of BLAS_BR rows for all heads at once; the products go to BLAS
  (np.matmul), the causal mask, softmax and dS are fused Numba loops. Extra memory: two
  (B*NH, BR, T) tiles, so it grows with T (not T^2), but it is not online-softmax tiling.
- "cpu_gemm" (the default "cpu"): one head per Numba thread, query tiles of GEMM_BR rows over
  keys 0..i1; each tile's products are single-threaded BLAS GEMM calls made from inside the
  kernel (kernels/_blas.py), the softmax and dS loops run on the tile while it is in L2. The
  backward walks the tiles last to first, so the first GEMM into dk, dv (beta = 0) covers
  every key and no zeroing pass is needed. Extra memory: two (GEMM_BR, T) tiles per thread.
  Where NumPy's BLAS is not an OpenBLAS it can call, it runs cpu_blas instead.
- "gpu": one CUDA thread per query row with the same online softmax (forward), and two
  backward kernels: one thread per query row (dq) and one per key row (dk, dv), so every output
  has one writer (no atomics). Supports hs <= 128 (a per-thread local accumulator).
All inner loops run over 1-D slices from 0 (see kernels/matmul.py: that is what vectorises).

Leaves out: dropout, padding masks, non-causal attention, KV-cache decoding (the generator
calls the forward on the cached keys itself).
References: Vaswani et al. 2017; Dao et al. 2022 "FlashAttention" (tiling, online softmax,
backward from lse); llm.c attention_forward/backward.

Version log (B=8, NH=6, T=256, hs=64 float32, 2 threads; the 2 cores were shared with other
jobs during these runs, so only same-run comparisons mean anything):
  v1 cpu_plain / cpu_flash with per-key axpy loops over hs=64: fwd 70-85 ms, bwd 185-190 ms
     while the NumPy ref took 24 + 35..60 ms. Why: an inner loop of 64 floats behind a
     loop-carried store vectorises badly (micro-test: 4.6 GFLOP/s for acc += p[j] * V[j]);
     the dot-product (10 GFLOP/s) and 2x2-blocked (7 GFLOP/s) rewrites were no better, and a
     flash forward written with dot products throughout took 115 ms against 68 ms for v1 (min
     of 8, same run), and a flash backward accumulating dK^T/dV^T tiles by outer products took
     99 ms against 83 ms (min of 6, same run). Numba gives no BLAS-class micro-kernel here
     (no scipy, so no np.dot inside njit).
  v2 cpu_blas: query tiles of all heads at once, the products in OpenBLAS, masked softmax and
     dS fused in Numba. In one run: BR=32: 34+62 ms, 64: 33+56, 128: 24+45, 256: 23+56, ref
     36+60 ms (a quiet moment: load average 2.4). Memory grows with T (two
     (B*NH, 128, T) tiles), not T^2.
  Observed under heavy CPU contention (load average 5-10 on the 2 cores from other jobs):
     cpu_blas, which alternates OpenBLAS calls and Numba prange loops, swung from 19 to 3400 ms
     per call, more than the pure-Numba flash (40-90 ms, one 12.7 s outlier) or the ref; no
     threading-layer setting (omp, OMP_WAIT_POLICY=PASSIVE, workqueue, OPENBLAS_THREAD_TIMEOUT=4)
     was a clear win in interleaved runs. fwd+bwd round-robin, min (median) of 10, two runs at
     load average 4.7: ref 288 (506) / 481 (737) ms, cpu_plain 185 (242) / 259 (289),
     cpu_flash 180 (225) / 192 (247), cpu_blas 390 (1054) / 538 (1081). So "cpu" = cpu_flash:
     fastest where these machines actually run (shared), no BLAS/OpenMP interplay, and O(T)
     memory; cpu_blas stays in VARIANTS and wins on a quiet machine.
  benchmarks/kernels.py (torch imported first, caches flushed and thread pools idle before each
     call, min of 10 round-robin, load average 3.4): ref 49.8 ms, cpu_plain 54.8, cpu_flash
     59.5, cpu_blas 56.1, PyTorch SDPA 24.5. Target missed: every variant is ~2.3x slower than
     PyTorch and no faster than the NumPy ref. What would close it: a register-blocked micro-
     kernel (or BLAS called on tiles from inside the Numba loop), not more loop reshuffling.
  v3 (lead, after OMP_WAIT_POLICY=PASSIVE became tinylm's default; quiet machine, load 0.7,
     median of 8 fwd / bwd ms): B=8 NH=6 T=256 hs=64: ref 21.6/36.3, cpu_plain 15.0/31.6,
     cpu_flash 17.2/38.2, cpu_blas 8.6/18.0. B=16 NH=4 T=128 hs=32: ref 9.4/16.8, cpu_plain
     5.1/16.8, cpu_flash 6.5/17.5, cpu_blas 4.2/9.7. A later run of the same script at M:
     cpu_blas 11.1/23.1, cpu_flash 17.5/40.2. Separate processes, fwd+bwd back to back, median
     (min) of 20, two runs each: cpu_blas 49.6 (34.2) / 48.1 (34.9) ms, PyTorch SDPA 26.5 (22.2)
     / 23.8 (21.6) ms. So cpu_blas is the fastest variant and "cpu" now, but still ~1.5-2x
     slower than PyTorch: target missed. (In one process with torch imported first, cpu_blas
     took 60-90 ms: torch's OpenMP runtime, loaded before tinylm could ask for passive
     waiting, spins.) Much of the earlier swings were the two spinning pools starving each other.
  v4 cpu_gemm (this session): the products are OpenBLAS GEMM calls made from inside a Numba
     kernel that runs one head per thread (kernels/_blas.py binds NumPy's own cblas_sgemm),
     so a head's (64, T) score tile stays in L2 between its GEMM, softmax and P V instead of a
     (B*NH, 128, T) batched tile going out to memory. fwd/bwd min of 15 in one process, B=8 NH=6
     T=256 hs=64: query tiles of 32 rows 5.1/10.2 ms, 64: 5.3/9.2, 128: 5.3/11.2, cpu_blas
     9.2/17.2. Of the 64-row forward, the GEMMs alone take 4.0 ms (126 GFLOP/s on the causal
     0.625 of the full products). The forward divides each output row by its softmax sum after
     P V (hs divisions a row instead of T). benchmarks/kernels.py (torch imported first, min of
     15 round-robin): cpu_gemm 14.0-15.5 ms, PyTorch SDPA 24.6-27.0 ms (0.54-0.63x), ref
     45.8-48.0 ms (3.0-3.3x). Targets met; "cpu" = cpu_gemm.
     Found on the way: inside a model, attention took 2x its standalone time because the GEMM
     just before it left OpenBLAS's worker spinning on the second core (measured: 5.4/9.3 ms
     standalone, 9.1/17.9 ms right after a (2048,384)@(384,1536) np.matmul, 4.9/10.5 ms after it
     with OPENBLAS_THREAD_TIMEOUT=4). Hence kernels/matmul.py "cpu": every tinylm GEMM threaded
     by Numba, OpenBLAS's own pool unused.
  v5 cpu_gemm on strided views: the GEMMs read each head's rows with their leading dimension,
     so q, k, v come straight from the fused (B, T, 3C) projection and out / dq, dk, dv are
     written in (B, T, C) / (B, T, 3C) order: the six head split/merge copies per layer are gone
     (config S training step 141 -> 101 ms in back-to-back single-round runs; noisy).
     Later benchmarks/kernels.py runs: 14.9-16.9 ms vs SDPA 23.2-27.8 ms (0.61-0.64x), 4.1-4.3x
     the ref. Peak extra memory at T=2048 (below): 10.3 MiB, two (64, T) tiles per thread.
  Peak extra memory fwd+bwd at B=1, NH=6, T=2048 (benchmarks/kernels.py): ref 304 MiB,
     cpu_plain 73 MiB, cpu_flash 15.5 MiB (of which 15 MiB are outputs, gradients and K^T/V^T).
"""
from __future__ import annotations

import math

import numpy as np
from numba import float64, njit, prange

from kernels._common import FASTMATH, array_module, load_cuda, main_check
from kernels._mathfn import fexp
from kernels.registry import register

cuda = None  # numba.cuda, bound on first GPU use by load_cuda (see kernels/_common.py)


def _causal_scores(q, k):
    xp = array_module(q)
    T, hs = q.shape[-2], q.shape[-1]
    s = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(hs))
    mask = xp.triu(xp.ones((T, T), dtype=bool), 1)
    return xp.where(mask, -xp.inf, s).astype(q.dtype)


@register("attention_fwd", "ref")
def attention_fwd_ref(q, k, v):  # (B,NH,T,hs) x3 -> (B,NH,T,hs), (B,NH,T)
    xp = array_module(q)
    s = _causal_scores(q, k)
    m = s.max(axis=-1, keepdims=True)
    p = xp.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    out = (p / l) @ v
    lse = (m + xp.log(l))[..., 0]
    return out, lse


@register("attention_bwd", "ref")
def attention_bwd_ref(dout, q, k, v, out, lse):  # -> dq, dk, dv (B,NH,T,hs)
    xp = array_module(q)
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = xp.exp(_causal_scores(q, k) - lse[..., None])  # masked entries: exp(-inf) = 0
    dv = p.swapaxes(-1, -2) @ dout
    dp = dout @ v.swapaxes(-1, -2)
    D = (dout * out).sum(axis=-1, keepdims=True)
    ds = p * (dp - D)
    dq = (ds @ k) * scale
    dk = (ds.swapaxes(-1, -2) @ q) * scale
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Numba CPU: shared helpers (serial; each loops over 1-D slices from 0 so it vectorises)

@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _scores(a, bT, j0, out):  # (hs,), (hs,T), int, (n,): out[j] = sum_d a[d] * bT[d, j0 + j]
    n = out.size
    for j in range(n):
        out[j] = 0
    for d in range(a.size):
        ad = a[d]
        brow = bT[d, j0:j0 + n]
        for j in range(n):  # outer-product form: no horizontal sums, contiguous in bT
            out[j] += ad * brow[j]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _axpy(alpha, x, y):  # y += alpha * x, (hs,)
    for d in range(y.size):
        y[d] += alpha * x[d]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _dot(x, y):
    s = x[0] * 0
    for d in range(x.size):
        s += x[d] * y[d]
    return s


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _exp_shift(s, shift):  # s <- exp(s - shift) in place, returns the sum
    tot = s[0] * 0
    for j in range(s.size):
        e = fexp(s[j] - shift)
        s[j] = e
        tot += e
    return tot


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _transpose_heads(x, xT):  # (BH,T,hs) -> (BH,hs,T)
    for h in range(x.shape[0]):
        xT[h] = x[h].T


# ---------------------------------------------------------------------------------------------
# Numba CPU, plain: materialise S / P / dS (T, T) per head

@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _attn_fwd_plain(q, kT, v, scale, out, lse):  # (BH,T,hs), (BH,hs,T), (BH,T,hs) -> out, lse
    BH, T, hs = q.shape
    for h in prange(BH):
        S = np.empty((T, T), dtype=q.dtype)  # the T x T this variant is named for
        qs = np.empty(hs, dtype=q.dtype)
        for i in range(T):
            for d in range(hs):
                qs[d] = q[h, i, d] * scale
            _scores(qs, kT[h], 0, S[i, :i + 1])  # causal: only j <= i is computed
        for i in range(T):
            srow = S[i, :i + 1]
            m = srow.max()
            l = _exp_shift(srow, m)
            lse[h, i] = m + np.log(l)
            o = out[h, i]
            o[:] = 0
            inv = 1 / l
            for j in range(i + 1):
                _axpy(srow[j] * inv, v[h, j], o)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _attn_bwd_plain(dout, q, k, kT, v, vT, out, lse, scale, dq, dk, dv):
    BH, T, hs = q.shape
    for h in prange(BH):
        P = np.empty((T, T), dtype=q.dtype)
        dS = np.empty((T, T), dtype=q.dtype)
        qs = np.empty(hs, dtype=q.dtype)
        # pass 1: P = exp(S - lse), dP = dout V^T, dS = P * (dP - D), row by row
        for i in range(T):
            for d in range(hs):
                qs[d] = q[h, i, d] * scale
            prow = P[i, :i + 1]
            _scores(qs, kT[h], 0, prow)
            _exp_shift(prow, lse[h, i])
            dsrow = dS[i, :i + 1]
            _scores(dout[h, i], vT[h], 0, dsrow)
            Di = _dot(dout[h, i], out[h, i])
            for j in range(i + 1):
                dsrow[j] = prow[j] * (dsrow[j] - Di)
        # pass 2: dq = scale dS K, dk = scale dS^T Q, dv = P^T dout
        dq[h] = 0
        dk[h] = 0
        dv[h] = 0
        for i in range(T):
            for j in range(i + 1):
                a = dS[i, j] * scale
                _axpy(a, k[h, j], dq[h, i])
                _axpy(a, q[h, i], dk[h, j])
                _axpy(P[i, j], dout[h, i], dv[h, j])


# ---------------------------------------------------------------------------------------------
# Numba CPU, flash: tiled online softmax, O(T) memory

@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _attn_fwd_flash(q, kT, v, scale, out, lse, BR, BC):
    BH, T, hs = q.shape
    nqt = (T + BR - 1) // BR
    for u in prange(BH * nqt):  # (head, query tile): causal tiles differ in cost, many units
        h = u // nqt
        i0 = (u - h * nqt) * BR
        i1 = min(T, i0 + BR)
        nr = i1 - i0
        m = np.full(nr, -np.inf, dtype=q.dtype)
        l = np.zeros(nr, dtype=q.dtype)
        qs = np.empty((nr, hs), dtype=q.dtype)
        srow = np.empty(BC, dtype=q.dtype)
        acc = out[h, i0:i1]  # accumulate straight into the output rows
        acc[:] = 0
        for r in range(nr):
            for d in range(hs):
                qs[r, d] = q[h, i0 + r, d] * scale
        for j0 in range(0, i1, BC):  # key tiles this query tile can see
            for r in range(nr):
                i = i0 + r
                n = min(j0 + BC, i + 1) - j0
                if n <= 0:
                    continue
                s = srow[:n]
                _scores(qs[r], kT[h], j0, s)
                mnew = max(m[r], s.max())
                corr = fexp(m[r] - mnew)  # 0 (1.6e-38) on the first tile, where acc = l = 0
                l[r] = l[r] * corr + _exp_shift(s, mnew)
                m[r] = mnew
                a = acc[r]
                for d in range(hs):
                    a[d] *= corr
                for j in range(n):
                    _axpy(s[j], v[h, j0 + j], a)
        for r in range(nr):
            inv = 1 / l[r]
            a = acc[r]
            for d in range(hs):
                a[d] *= inv
            lse[h, i0 + r] = m[r] + np.log(l[r])


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _attn_bwd_flash(dout, q, k, kT, v, vT, out, lse, scale, dq, dk, dv, BC):
    BH, T, hs = q.shape
    for h in prange(BH):  # one writer per head for dq, dk, dv: race-free
        D = np.empty(T, dtype=q.dtype)
        qs = np.empty((T, hs), dtype=q.dtype)
        p = np.empty(BC, dtype=q.dtype)
        ds = np.empty(BC, dtype=q.dtype)
        for i in range(T):
            D[i] = _dot(dout[h, i], out[h, i])  # D = rowsum(dout * out) = rowsum(dP * P)
            for d in range(hs):
                qs[i, d] = q[h, i, d] * scale
        dq[h] = 0
        dk[h] = 0
        dv[h] = 0
        for j0 in range(0, T, BC):  # dk, dv rows of this key tile stay in L1 over all i
            for i in range(j0, T):
                n = min(j0 + BC, i + 1) - j0
                pr = p[:n]
                dr = ds[:n]
                _scores(qs[i], kT[h], j0, pr)
                _exp_shift(pr, lse[h, i])        # forward: P = exp(S - lse)
                _scores(dout[h, i], vT[h], j0, dr)  # forward: out = P V, so dP = dout V^T
                Di = D[i]
                for j in range(n):
                    dr[j] = pr[j] * (dr[j] - Di) * scale  # dS (scaled: S = scale Q K^T)
                dqi = dq[h, i]
                for j in range(n):
                    _axpy(dr[j], k[h, j0 + j], dqi)
                    _axpy(dr[j], q[h, i], dk[h, j0 + j])
                    _axpy(pr[j], dout[h, i], dv[h, j0 + j])


def _heads(x):
    B, NH, T, hs = x.shape
    return np.ascontiguousarray(x).reshape(B * NH, T, hs)


def _transposed(x3):
    xT = np.empty((x3.shape[0], x3.shape[2], x3.shape[1]), dtype=x3.dtype)
    _transpose_heads(x3, xT)
    return xT


FLASH_BR, FLASH_BC = 64, 64  # tiles: 64 keys x 64 hs x 4 B = 16 KiB of K or V, half of L1d


def attention_fwd_cpu_plain(q, k, v):
    B, NH, T, hs = q.shape
    out = np.empty(q.shape, dtype=q.dtype)  # C order whatever q's strides: reshaped below
    lse = np.empty((B, NH, T), dtype=q.dtype)
    _attn_fwd_plain(_heads(q), _transposed(_heads(k)), _heads(v), q.dtype.type(1 / math.sqrt(hs)),
                    out.reshape(B * NH, T, hs), lse.reshape(B * NH, T))
    return out, lse


def attention_fwd_cpu_flash(q, k, v, *, br=None, bc=None):  # tiles: keyword-only, for tests
    B, NH, T, hs = q.shape
    out = np.empty(q.shape, dtype=q.dtype)  # C order whatever q's strides: reshaped below
    lse = np.empty((B, NH, T), dtype=q.dtype)
    _attn_fwd_flash(_heads(q), _transposed(_heads(k)), _heads(v), q.dtype.type(1 / math.sqrt(hs)),
                    out.reshape(B * NH, T, hs), lse.reshape(B * NH, T), br or FLASH_BR, bc or FLASH_BC)
    return out, lse


def _bwd_args(dout, q, k, v, out, lse):
    B, NH, T, hs = q.shape
    k3, v3 = _heads(k), _heads(v)
    grads = tuple(np.empty(q.shape, dtype=q.dtype) for _ in range(3))
    args = (_heads(dout), _heads(q), k3, _transposed(k3), v3, _transposed(v3), _heads(out),
            np.ascontiguousarray(lse).reshape(B * NH, T), q.dtype.type(1 / math.sqrt(hs)))
    return args, grads, tuple(g.reshape(B * NH, T, hs) for g in grads)


def attention_bwd_cpu_plain(dout, q, k, v, out, lse):
    args, grads, views = _bwd_args(dout, q, k, v, out, lse)
    _attn_bwd_plain(*args, *views)
    return grads


def attention_bwd_cpu_flash(dout, q, k, v, out, lse, *, bc=None):
    args, grads, views = _bwd_args(dout, q, k, v, out, lse)
    _attn_bwd_flash(*args, *views, bc or FLASH_BC)
    return grads


# ---------------------------------------------------------------------------------------------
# Numba CPU + BLAS, "cpu_blas": query tiles of BLAS_BR rows for all heads at once; the four
# products per tile go to BLAS (np.matmul, batched over heads, keys 0..i1 only: causal tiles
# skip the upper-right blocks), the causal mask, softmax and dS are fused Numba loops.
# Extra memory: two (B*NH, BLAS_BR, T) tiles, so it grows with T, not T^2.

@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _softmax_tile(S, i0, scale, lse):  # S (BH, R, L) raw scores of query rows i0..i0+R-1
    BH, R, L = S.shape
    for u in prange(BH * R):
        h = u // R
        r = u - h * R
        row = S[h, r]
        n = i0 + r + 1  # causal: keys 0..i
        m = row[0] * scale
        for j in range(n):
            row[j] *= scale
            m = max(m, row[j])
        tot = m * 0
        for j in range(n):
            e = fexp(row[j] - m)
            row[j] = e
            tot += e
        inv = 1 / tot
        for j in range(n):
            row[j] *= inv
        for j in range(n, L):  # masked keys: exactly 0 so P @ V ignores them
            row[j] = 0
        lse[h, i0 + r] = m + np.log(tot)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _ds_tile(S, dP, i0, scale, lse, D):  # S raw scores -> P (in S); dP -> scale * dS (in dP)
    BH, R, L = S.shape
    for u in prange(BH * R):
        h = u // R
        r = u - h * R
        row = S[h, r]
        drow = dP[h, r]
        n = i0 + r + 1
        l = lse[h, i0 + r]
        Di = D[h, i0 + r]
        for j in range(n):
            p = fexp(row[j] * scale - l)   # forward: P = exp(S - lse)
            row[j] = p
            drow[j] = p * (drow[j] - Di) * scale  # dS = P (dP - D), times the score scale
        for j in range(n, L):
            row[j] = 0
            drow[j] = 0


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _rowdot(a, b, out):  # (BH,T,hs) x2 -> (BH,T): D = rowsum(dout * out)
    BH, T, hs = a.shape
    for u in prange(BH * T):
        h = u // T
        i = u - h * T
        out[h, i] = _dot(a[h, i], b[h, i])


BLAS_BR = 128  # query rows per tile; measured at T=256: 128 beat 32, 64 and 256 (see log)


def attention_fwd_cpu_blas(q, k, v, *, br=None):
    B, NH, T, hs = q.shape
    br = br or BLAS_BR
    q3, k3, v3 = _heads(q), _heads(k), _heads(v)
    out = np.empty_like(q3)
    lse = np.empty((B * NH, T), dtype=q.dtype)
    scale = q.dtype.type(1 / math.sqrt(hs))
    for i0 in range(0, T, br):
        i1 = min(T, i0 + br)
        S = np.matmul(q3[:, i0:i1], k3[:, :i1].transpose(0, 2, 1))  # (BH, R, i1)
        _softmax_tile(S, i0, scale, lse)
        np.matmul(S, v3[:, :i1], out=out[:, i0:i1])
    return out.reshape(q.shape), lse.reshape(B, NH, T)


def attention_bwd_cpu_blas(dout, q, k, v, out, lse, *, br=None):
    B, NH, T, hs = q.shape
    br = br or BLAS_BR
    q3, k3, v3, do3, o3 = (_heads(x) for x in (q, k, v, dout, out))
    l3 = np.ascontiguousarray(lse).reshape(B * NH, T)
    D = np.empty((B * NH, T), dtype=q.dtype)
    _rowdot(do3, o3, D)
    scale = q.dtype.type(1 / math.sqrt(hs))
    dq = np.empty_like(q3)
    dk = np.zeros_like(q3)
    dv = np.zeros_like(q3)
    tmp = np.empty_like(q3)
    for i0 in range(0, T, br):
        i1 = min(T, i0 + br)
        S = np.matmul(q3[:, i0:i1], k3[:, :i1].transpose(0, 2, 1))
        dP = np.matmul(do3[:, i0:i1], v3[:, :i1].transpose(0, 2, 1))  # dP = dout V^T
        _ds_tile(S, dP, i0, scale, l3, D)
        np.matmul(dP, k3[:, :i1], out=dq[:, i0:i1])                   # dQ = dS K
        t = tmp[:, :i1]
        np.matmul(dP.transpose(0, 2, 1), q3[:, i0:i1], out=t)         # dK += dS^T Q
        dk[:, :i1] += t
        np.matmul(S.transpose(0, 2, 1), do3[:, i0:i1], out=t)         # dV += P^T dout
        dv[:, :i1] += t
    return dq.reshape(q.shape), dk.reshape(q.shape), dv.reshape(q.shape)


# ---------------------------------------------------------------------------------------------
# Numba CPU + GEMM per head, "cpu_gemm": one head per Numba thread; for each query tile of
# GEMM_BR rows (keys 0..i1 only) the products are BLAS GEMM calls made from inside the kernel
# (kernels/_blas.py), the softmax / dS loops run on the tile while it is still in L2.
# Extra memory: two (GEMM_BR, T) tiles per thread.
# The (B, NH, T, hs) arrays may be strided views (unit stride along hs): a GEMM reads a head's
# rows with its leading dimension, so q, k, v can be views into a fused (B, T, 3C) projection
# and out, dout, dq, dk, dv views into (B, T, C) / (B, T, 3C) arrays, with no copies.
# gemm: the CBLAS ctypes function (an argument, so the kernel stays cacheable).

@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _ld(x):  # leading dimension (elements between rows t and t+1) of a (B, NH, T, hs) view
    return x.strides[2] // x.itemsize


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _attn_fwd_gemm(gemm, q, k, v, scale, out, lse, BR):  # (B,NH,T,hs) x3 -> out, lse (B,NH,T)
    B, NH, T, hs = q.shape
    isz = q.itemsize
    lq, lk, lv, lo = _ld(q), _ld(k), _ld(v), _ld(out)
    zero = scale - scale
    one = scale / scale
    for u in prange(B * NH):
        b, h = u // NH, u % NH
        S = np.empty((BR, T), dtype=q.dtype)
        tots = np.empty(BR, dtype=q.dtype)
        sa = S.ctypes.data
        qa, ka, va, oa = q[b, h].ctypes.data, k[b, h].ctypes.data, v[b, h].ctypes.data, out[b, h].ctypes.data
        for i0 in range(0, T, BR):
            R = min(BR, T - i0)
            n = i0 + R
            # S (R, n) = scale * Q[i0:n] K[:n]^T
            gemm(101, 111, 112, R, n, hs, scale, qa + i0 * lq * isz, lq, ka, lk, zero, sa, T)
            for r in range(R):
                row = S[r]
                c = i0 + r + 1  # causal: keys 0..i0+r
                m = row[0]
                for j in range(c):
                    m = max(m, row[j])
                tot = _exp_shift(row[:c], m)  # unnormalised: out's row is divided below
                tots[r] = tot
                for j in range(c, n):  # masked keys: exactly 0 so P V ignores them
                    row[j] = 0
                lse[b, h, i0 + r] = m + np.log(tot)
            # out[i0:n] (R, hs) = exp(S - m) (R, n) V[:n], then each row / its sum: P V with
            # hs divisions per row instead of n
            gemm(101, 111, 111, R, hs, n, one, sa, T, va, lv, zero, oa + i0 * lo * isz, lo)
            for r in range(R):
                orow = out[b, h, i0 + r]
                inv = 1 / tots[r]
                for d in range(hs):
                    orow[d] *= inv


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
def _attn_bwd_gemm(gemm, dout, q, k, v, out, lse, scale, dq, dk, dv, BR):
    B, NH, T, hs = q.shape
    isz = q.itemsize
    lq, lk, lv, ld_ = _ld(q), _ld(k), _ld(v), _ld(dout)
    lgq, lgk, lgv = _ld(dq), _ld(dk), _ld(dv)
    zero = scale - scale
    one = scale / scale
    for u in prange(B * NH):
        b, h = u // NH, u % NH
        S = np.empty((BR, T), dtype=q.dtype)
        dP = np.empty((BR, T), dtype=q.dtype)
        sa, pa = S.ctypes.data, dP.ctypes.data
        qa, ka, va, da = q[b, h].ctypes.data, k[b, h].ctypes.data, v[b, h].ctypes.data, dout[b, h].ctypes.data
        dqa, dka, dva = dq[b, h].ctypes.data, dk[b, h].ctypes.data, dv[b, h].ctypes.data
        # last tile first: it covers every key, so its beta = 0 initialises all of dk, dv
        first = True
        for i0 in range((T - 1) // BR * BR, -1, -BR):
            R = min(BR, T - i0)
            n = i0 + R
            gemm(101, 111, 112, R, n, hs, scale, qa + i0 * lq * isz, lq, ka, lk, zero, sa, T)  # S
            gemm(101, 111, 112, R, n, hs, one, da + i0 * ld_ * isz, ld_, va, lv, zero, pa, T)  # dP = dout V^T
            for r in range(R):
                i = i0 + r
                c = i + 1
                row = S[r]
                drow = dP[r]
                l = lse[b, h, i]
                Di = _dot(dout[b, h, i], out[b, h, i])
                for j in range(c):
                    p = fexp(row[j] - l)  # P = exp(S - lse), recomputed
                    row[j] = p
                    drow[j] = p * (drow[j] - Di) * scale  # dS = P (dP - D), times the score scale
                for j in range(c, n):
                    row[j] = 0
                    drow[j] = 0
            beta = zero if first else one
            first = False
            gemm(101, 111, 111, R, hs, n, one, pa, T, ka, lk, zero, dqa + i0 * lgq * isz, lgq)  # dQ = dS K
            gemm(101, 112, 111, n, hs, R, one, pa, T, qa + i0 * lq * isz, lq, beta, dka, lgk)    # dK += dS^T Q
            gemm(101, 112, 111, n, hs, R, one, sa, T, da + i0 * ld_ * isz, ld_, beta, dva, lgv)  # dV += P^T dout


GEMM_BR = 64  # query rows per tile (see the version log)


def _gemm_or_none(q):
    from kernels._blas import gemm_for  # noqa: PLC0415
    return gemm_for(q.dtype)


def _rows_view(x):
    """x itself if a GEMM can read its (T, hs) head matrices (unit stride along hs, rows at a
    positive multiple of the item size), else a contiguous copy."""
    st = x.strides
    ok = st[3] == x.itemsize and st[2] % x.itemsize == 0 and st[2] >= x.itemsize * max(1, x.shape[3])
    return x if ok and x.flags.aligned else np.ascontiguousarray(x)


def attention_fwd_cpu_gemm(q, k, v, *, br=None):
    """out is returned as a (B, NH, T, hs) view of a (B, T, NH, hs) array: merging the heads
    back to (B, T, C) is then a free reshape."""
    gemm = _gemm_or_none(q)
    if gemm is None:  # no OpenBLAS GEMM to call from Numba (MKL, Accelerate): batched matmul
        return attention_fwd_cpu_blas(q, k, v)
    from kernels._blas import blas_single_threaded  # noqa: PLC0415
    B, NH, T, hs = q.shape
    out = np.empty((B, T, NH, hs), dtype=q.dtype).transpose(0, 2, 1, 3)
    lse = np.empty((B, NH, T), dtype=q.dtype)
    with blas_single_threaded():
        _attn_fwd_gemm(gemm, _rows_view(q), _rows_view(k), _rows_view(v),
                       q.dtype.type(1 / math.sqrt(hs)), out, lse, br or GEMM_BR)
    return out, lse


def attention_bwd_cpu_gemm(dout, q, k, v, out, lse, *, br=None):
    """dq, dk, dv are returned as (B, NH, T, hs) views of one (B, T, 3, NH, hs) array, the
    layout of the gradient of a fused qkv projection (tinylm.functional.AttentionQKV uses it
    as is)."""
    gemm = _gemm_or_none(q)
    if gemm is None:
        return attention_bwd_cpu_blas(dout, q, k, v, out, lse)
    from kernels._blas import blas_single_threaded  # noqa: PLC0415
    B, NH, T, hs = q.shape
    g = np.empty((B, T, 3, NH, hs), dtype=q.dtype)
    dq, dk, dv = (g[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    with blas_single_threaded():
        _attn_bwd_gemm(gemm, _rows_view(dout), _rows_view(q), _rows_view(k), _rows_view(v),
                       _rows_view(out), np.ascontiguousarray(lse), q.dtype.type(1 / math.sqrt(hs)),
                       dq, dk, dv, br or GEMM_BR)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# GPU: one thread per query row (forward, dq) or key row (dk, dv); float64 local accumulators.

HS_MAX = 128  # local-array size must be a compile-time constant
ATT_THREADS = 128


def _attn_fwd_gpu_kernel(q, k, v, scale, out, lse):  # (BH,T,hs) x3, float, (BH,T,hs), (BH,T)
    u = cuda.grid(1)
    BH, T, hs = q.shape
    if u < BH * T:
        h = u // T
        i = u - h * T
        acc = cuda.local.array(HS_MAX, dtype=float64)
        for d in range(hs):
            acc[d] = 0.0
        m = -math.inf
        l = 0.0
        for j in range(i + 1):  # causal; online softmax, one key at a time
            s = 0.0
            for d in range(hs):
                s += q[h, i, d] * k[h, j, d]
            s *= scale
            mnew = max(m, s)
            corr = math.exp(m - mnew)  # exp(-inf) = 0 on the first key
            p = math.exp(s - mnew)
            l = l * corr + p
            for d in range(hs):
                acc[d] = acc[d] * corr + p * v[h, j, d]
            m = mnew
        for d in range(hs):
            out[h, i, d] = acc[d] / l
        lse[h, i] = m + math.log(l)


def _attn_bwd_dq_gpu_kernel(dout, q, k, v, out, lse, scale, dq, D):
    u = cuda.grid(1)
    BH, T, hs = q.shape
    if u < BH * T:
        h = u // T
        i = u - h * T
        Di = 0.0
        for d in range(hs):
            Di += dout[h, i, d] * out[h, i, d]
        D[h, i] = Di
        acc = cuda.local.array(HS_MAX, dtype=float64)
        for d in range(hs):
            acc[d] = 0.0
        for j in range(i + 1):
            s = 0.0
            dp = 0.0
            for d in range(hs):
                s += q[h, i, d] * k[h, j, d]
                dp += dout[h, i, d] * v[h, j, d]
            p = math.exp(s * scale - lse[h, i])
            ds = p * (dp - Di) * scale
            for d in range(hs):
                acc[d] += ds * k[h, j, d]
        for d in range(hs):
            dq[h, i, d] = acc[d]


def _attn_bwd_dkdv_gpu_kernel(dout, q, k, v, lse, D, scale, dk, dv):
    u = cuda.grid(1)
    BH, T, hs = q.shape
    if u < BH * T:
        h = u // T
        j = u - h * T
        ak = cuda.local.array(HS_MAX, dtype=float64)
        av = cuda.local.array(HS_MAX, dtype=float64)
        for d in range(hs):
            ak[d] = 0.0
            av[d] = 0.0
        for i in range(j, T):  # the queries that attend to key j
            s = 0.0
            dp = 0.0
            for d in range(hs):
                s += q[h, i, d] * k[h, j, d]
                dp += dout[h, i, d] * v[h, j, d]
            p = math.exp(s * scale - lse[h, i])
            ds = p * (dp - D[h, i]) * scale
            for d in range(hs):
                ak[d] += ds * q[h, i, d]
                av[d] += p * dout[h, i, d]
        for d in range(hs):
            dk[h, j, d] = ak[d]
            dv[h, j, d] = av[d]


_GPU = {}


def _gpu():
    if not _GPU:
        cu = load_cuda(globals())
        _GPU["fwd"] = cu.jit(_attn_fwd_gpu_kernel)
        _GPU["dq"] = cu.jit(_attn_bwd_dq_gpu_kernel)
        _GPU["dkdv"] = cu.jit(_attn_bwd_dkdv_gpu_kernel)
    return _GPU


def _gpu_heads(x):
    B, NH, T, hs = x.shape
    if hs > HS_MAX:
        raise ValueError(f"GPU attention supports head size <= {HS_MAX}, got {hs}")
    return array_module(x).ascontiguousarray(x).reshape(B * NH, T, hs)


def _gpu_grid(n):
    return max(1, (n + ATT_THREADS - 1) // ATT_THREADS), ATT_THREADS


@register("attention_fwd", "gpu")
def attention_fwd_gpu(q, k, v):
    xp = array_module(q)
    B, NH, T, hs = q.shape
    out = xp.empty(q.shape, dtype=q.dtype)  # C order whatever q's strides: reshaped below
    lse = xp.empty((B, NH, T), dtype=q.dtype)
    _gpu()["fwd"][_gpu_grid(B * NH * T)](_gpu_heads(q), _gpu_heads(k), _gpu_heads(v),
                                         1 / math.sqrt(hs), out.reshape(B * NH, T, hs),
                                         lse.reshape(B * NH, T))
    return out, lse


@register("attention_bwd", "gpu")
def attention_bwd_gpu(dout, q, k, v, out, lse):
    xp = array_module(q)
    B, NH, T, hs = q.shape
    a = [_gpu_heads(x) for x in (dout, q, k, v, out)]
    l3 = xp.ascontiguousarray(lse).reshape(B * NH, T)
    dq, dk, dv = (xp.empty(q.shape, dtype=q.dtype) for _ in range(3))
    D = xp.empty((B * NH, T), dtype=q.dtype)
    scale = 1 / math.sqrt(hs)
    g = _gpu_grid(B * NH * T)
    kern = _gpu()
    kern["dq"][g](*a, l3, scale, dq.reshape(B * NH, T, hs), D)
    kern["dkdv"][g](a[0], a[1], a[2], a[3], l3, D, scale, dk.reshape(B * NH, T, hs),
                    dv.reshape(B * NH, T, hs))
    return dq, dk, dv


def gpu_kernels_for_ptx():
    """(name, python function, float32 signature) of each GPU kernel, for compile_ptx checks."""
    from numba import float32, void
    load_cuda(globals())
    t3, t2 = float32[:, :, ::1], float32[:, ::1]
    return [
        ("attention_fwd", _attn_fwd_gpu_kernel, void(t3, t3, t3, float64, t3, t2)),
        ("attention_bwd_dq", _attn_bwd_dq_gpu_kernel, void(t3, t3, t3, t3, t3, t2, float64, t3, t2)),
        ("attention_bwd_dkdv", _attn_bwd_dkdv_gpu_kernel,
         void(t3, t3, t3, t3, t2, t2, float64, t3, t3)),
    ]


# "cpu" = cpu_gemm (v4 in the log: the fastest, ~1.6x faster than cpu_blas and faster than
# PyTorch's SDPA); it falls back to cpu_blas where NumPy's BLAS is not an OpenBLAS it can call.
# Plain and flash stay for study; flash for O(T) memory without BLAS.
register("attention_fwd", "cpu")(attention_fwd_cpu_gemm)
register("attention_bwd", "cpu")(attention_bwd_cpu_gemm)

VARIANTS = {
    "attention_fwd": {"ref": attention_fwd_ref, "cpu_plain": attention_fwd_cpu_plain,
                      "cpu_flash": attention_fwd_cpu_flash, "cpu_blas": attention_fwd_cpu_blas,
                      "cpu_gemm": attention_fwd_cpu_gemm, "gpu": attention_fwd_gpu},
    "attention_bwd": {"ref": attention_bwd_ref, "cpu_plain": attention_bwd_cpu_plain,
                      "cpu_flash": attention_bwd_cpu_flash, "cpu_blas": attention_bwd_cpu_blas,
                      "cpu_gemm": attention_bwd_cpu_gemm, "gpu": attention_bwd_gpu},
}


if __name__ == "__main__":
    B, NH, T, hs = 8, 6, 256, 64
    rng = np.random.default_rng(0)
    q_, k_, v_, d_ = (rng.standard_normal((B, NH, T, hs)).astype(np.float32) for _ in range(4))
    o_, l_ = attention_fwd_ref(q_, k_, v_)
    main_check(VARIANTS, {
        "attention_fwd": (lambda xp: tuple(xp.asarray(a) for a in (q_, k_, v_)), ()),
        "attention_bwd": (lambda xp: tuple(xp.asarray(a) for a in (d_, q_, k_, v_, o_, l_)), ()),
    }, repeats=3)
