"""Causal scaled dot-product self-attention: forward and backward.

Math (per batch b, head h; scale = 1/sqrt(hs)):
    S = scale * Q K^T,  S[t, j] = -inf for j > t (causal mask)
    lse[t] = logsumexp_j S[t, j],  P = exp(S - lse),  out = P V
Backward (recomputes P from lse, never stores it):
    dV = P^T dout,  dP = dout V^T,  D[t] = sum_d dout[t, d] * out[t, d]
    dS = P * (dP - D),  dQ = scale * dS K,  dK = scale * dS^T Q
Grouped-query attention (GQA; NKV = NH is multi-head attention, NKV = 1 multi-query): keys and
values have NKV heads, NKV dividing NH, and query head h reads kv head h // G, G = NH / NKV.
Then dK, dV of a kv head are the sums of the above over its G query heads.
Shapes: B batch, NH query heads, NKV kv heads, T time, hs head size. q, out, dout, dq
(B, NH, T, hs); k, v, dk, dv (B, NKV, T, hs); lse (B, NH, T).

Variants (here: the reference, the one that runs, the GPU kernels):
- "cpu_gemm" (the default "cpu"): one head per Numba thread, query tiles of GEMM_BR rows over
  keys 0..i1; each tile's products are single-threaded BLAS GEMM calls made from inside the
  kernel (kernels/_blas.py), the softmax and dS loops run on the tile while it is in L2. The
  backward walks the tiles last to first, so the first GEMM into dk, dv (beta = 0) covers
  every key and no zeroing pass is needed. Extra memory: two (GEMM_BR, T) tiles per thread.
  GQA: the forward stays parallel over (batch, query head) (it only reads k, v); the backward
  is parallel over (batch, kv head) and walks the group's G query heads inside, so each dk, dv
  has one writer (race-free; B * NKV work units, fewer than B * NH).
  Where NumPy's BLAS is not an OpenBLAS it can call, it runs cpu_blas (from the lab) instead.
- "gpu": one CUDA thread per query row with the same online softmax (forward), and two
  backward kernels: one thread per query row (dq) and one per key row (dk, dv; it walks the
  group's G query heads), so every output has one writer (no atomics). Supports hs <= 128 (a
  per-thread local accumulator).
- In the lab (kernels/lab/attention.py, study variants and the fallback, each still checked
  against the reference and benchmarked): "cpu_plain" (the textbook S (T, T) per head),
  "cpu_flash" (online softmax over key tiles, O(T) memory without BLAS) and "cpu_blas" (query
  tiles of all heads at once, products in batched np.matmul). They take GQA shapes by repeating
  k, v per group (``repeat_kv``) and summing the group's dk, dv (``sum_groups``): extra memory
  and time, which is fine for study and for the fallback. The log below is of all of them.
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
  v6 GQA (k, v with NKV heads) in ref, cpu_gemm and gpu. cpu_gemm's GEMMs read the shared kv
     head in place (no repeat); with NKV = NH the kernels do exactly the work of v5. python -m
     kernels.attention --nkv N (B=8, NH=6, T=256, hs=64, medians of 3; the cores were shared,
     load average 3-4, and the ref's np.matmul swung from 48 to 1700 ms between runs): cpu_gemm
     fwd/bwd NKV=6 15.9/28.3 ms, NKV=2 20.5/41.2, NKV=1 16.0/29.4 in one run, and NKV=6
     23.5/43.0, NKV=2 23.8/44.0 in the next: the same work whatever NKV, as expected (the
     products do not shrink; only k, v's memory does), and the backward's B*NKV work units
     still balance 2 threads. The lab variants repeat k, v (see above).
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


def group_size(q, k, v) -> int:
    """G = NH / NKV, the query heads that share one kv head; checks that the shapes fit."""
    B, NH, T, hs = q.shape
    if k.shape != v.shape or k.ndim != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (B, T, hs) \
            or k.shape[1] < 1 or NH % k.shape[1]:
        raise ValueError(f"attention: q {q.shape} needs k, v of one shape (B, NKV, T, hs) with NKV "
                         f"dividing NH={NH}, got k {k.shape}, v {v.shape}")
    return NH // k.shape[1]


def repeat_kv(x, G):  # (B, NKV, T, hs) -> (B, NKV*G, T, hs): head h is kv head h // G
    return x if G == 1 else array_module(x).repeat(x, G, axis=1)


def sum_groups(d, G):  # (B, NKV*G, T, hs) -> (B, NKV, T, hs): each group's gradients summed
    if G == 1:
        return d
    B, NH, T, hs = d.shape
    return d.reshape(B, NH // G, G, T, hs).sum(axis=2)


@register("attention_fwd", "ref")
def attention_fwd_ref(q, k, v):  # (B,NH,T,hs), (B,NKV,T,hs) x2 -> (B,NH,T,hs), (B,NH,T)
    xp = array_module(q)
    G = group_size(q, k, v)
    B, NH, T, hs = q.shape
    qg = q.reshape(B, NH // G, G, T, hs)  # query head h = kv head * G + g
    s = _causal_scores(qg, k[:, :, None])  # (B, NKV, G, T, T): k broadcast over the group
    m = s.max(axis=-1, keepdims=True)
    p = xp.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    out = ((p / l) @ v[:, :, None]).reshape(q.shape)
    lse = (m + xp.log(l))[..., 0].reshape(B, NH, T)
    return out, lse


@register("attention_bwd", "ref")
def attention_bwd_ref(dout, q, k, v, out, lse):  # -> dq (B,NH,T,hs), dk, dv (B,NKV,T,hs)
    xp = array_module(q)
    G = group_size(q, k, v)
    B, NH, T, hs = q.shape
    scale = 1.0 / math.sqrt(hs)
    qg, dg, og = (x.reshape(B, NH // G, G, T, hs) for x in (q, dout, out))
    kg, vg = k[:, :, None], v[:, :, None]  # (B, NKV, 1, T, hs): shared by the group
    p = xp.exp(_causal_scores(qg, kg) - lse.reshape(B, NH // G, G, T)[..., None])  # masked: 0
    dv = (p.swapaxes(-1, -2) @ dg).sum(axis=2)  # the group's query heads all read this v
    dp = dg @ vg.swapaxes(-1, -2)
    D = (dg * og).sum(axis=-1, keepdims=True)
    ds = p * (dp - D)
    dq = ((ds @ kg) * scale).reshape(q.shape)
    dk = ((ds.swapaxes(-1, -2) @ qg) * scale).sum(axis=2)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Numba CPU: helpers shared with the lab's variants (serial; each loops over 1-D slices from 0
# so it vectorises)

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
def _attn_fwd_gemm(gemm, q, k, v, scale, out, lse, BR):  # (B,NH,T,hs), (B,NKV,T,hs) x2 -> out, lse
    B, NH, T, hs = q.shape
    G = NH // k.shape[1]  # query heads per kv head
    isz = q.itemsize
    lq, lk, lv, lo = _ld(q), _ld(k), _ld(v), _ld(out)
    zero = scale - scale
    one = scale / scale
    for u in prange(B * NH):  # reads k, v only: query heads sharing a kv head run in parallel
        b, h = u // NH, u % NH
        S = np.empty((BR, T), dtype=q.dtype)
        tots = np.empty(BR, dtype=q.dtype)
        sa = S.ctypes.data
        qa, ka, va, oa = q[b, h].ctypes.data, k[b, h // G].ctypes.data, v[b, h // G].ctypes.data, out[b, h].ctypes.data
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
    NKV = k.shape[1]
    G = NH // NKV
    isz = q.itemsize
    lq, lk, lv, ld_ = _ld(q), _ld(k), _ld(v), _ld(dout)
    lgq, lgk, lgv = _ld(dq), _ld(dk), _ld(dv)
    zero = scale - scale
    one = scale / scale
    for u in prange(B * NKV):  # one writer per kv head's dk, dv: its G query heads run here
        b, kh = u // NKV, u % NKV
        S = np.empty((BR, T), dtype=q.dtype)
        dP = np.empty((BR, T), dtype=q.dtype)
        sa, pa = S.ctypes.data, dP.ctypes.data
        ka, va = k[b, kh].ctypes.data, v[b, kh].ctypes.data
        dka, dva = dk[b, kh].ctypes.data, dv[b, kh].ctypes.data
        # the first query head's last tile covers every key: its beta = 0 initialises all of
        # dk, dv; every later tile and head adds (beta = 1)
        first = True
        for g in range(G):
            h = kh * G + g
            qa, da, dqa = q[b, h].ctypes.data, dout[b, h].ctypes.data, dq[b, h].ctypes.data
            for i0 in range((T - 1) // BR * BR, -1, -BR):  # last tile first
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
    group_size(q, k, v)
    gemm = _gemm_or_none(q)
    if gemm is None:  # no OpenBLAS GEMM to call from Numba (MKL, Accelerate): batched matmul
        from kernels.lab import attention as lab  # noqa: PLC0415
        return lab.attention_fwd_cpu_blas(q, k, v)
    from kernels._blas import blas_single_threaded  # noqa: PLC0415
    B, NH, T, hs = q.shape
    out = np.empty((B, T, NH, hs), dtype=q.dtype).transpose(0, 2, 1, 3)
    lse = np.empty((B, NH, T), dtype=q.dtype)
    with blas_single_threaded():
        _attn_fwd_gemm(gemm, _rows_view(q), _rows_view(k), _rows_view(v),
                       q.dtype.type(1 / math.sqrt(hs)), out, lse, br or GEMM_BR)
    return out, lse


def attention_bwd_cpu_gemm(dout, q, k, v, out, lse, *, br=None):
    """dq, dk, dv are returned as (B, NH|NKV, T, hs) views of one array laid out as the gradient
    of a fused qkv projection: (B, T, 3, NH, hs) when NKV = NH (tinylm.functional.AttentionQKV
    uses it as is), else (B, T, NH + 2 NKV, hs), the q heads, then the k heads, then the v heads."""
    G = group_size(q, k, v)
    gemm = _gemm_or_none(q)
    if gemm is None:
        from kernels.lab import attention as lab  # noqa: PLC0415
        return lab.attention_bwd_cpu_blas(dout, q, k, v, out, lse)
    from kernels._blas import blas_single_threaded  # noqa: PLC0415
    B, NH, T, hs = q.shape
    if G == 1:
        g = np.empty((B, T, 3, NH, hs), dtype=q.dtype)
        dq, dk, dv = (g[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    else:
        NKV = NH // G
        g = np.empty((B, T, NH + 2 * NKV, hs), dtype=q.dtype)
        dq, dk, dv = (g[:, :, a:z].transpose(0, 2, 1, 3)
                      for a, z in ((0, NH), (NH, NH + NKV), (NH + NKV, NH + 2 * NKV)))
    with blas_single_threaded():
        _attn_bwd_gemm(gemm, _rows_view(dout), _rows_view(q), _rows_view(k), _rows_view(v),
                       _rows_view(out), np.ascontiguousarray(lse), q.dtype.type(1 / math.sqrt(hs)),
                       dq, dk, dv, br or GEMM_BR)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# GPU: one thread per query row (forward, dq) or key row (dk, dv); float64 local accumulators.
# Heads flattened: q rows (B*NH, T, hs), k, v rows (B*NKV, T, hs); with h = b*NH + hq, the kv
# row of query row h is h // G (= b*NKV + hq // G, as G divides NH).

HS_MAX = 128  # local-array size must be a compile-time constant
ATT_THREADS = 128


def _attn_fwd_gpu_kernel(q, k, v, scale, G, out, lse):  # (BH,T,hs), (BKV,T,hs) x2, float, int -> out, lse
    u = cuda.grid(1)
    BH, T, hs = q.shape
    if u < BH * T:
        h = u // T
        i = u - h * T
        kh = h // G
        acc = cuda.local.array(HS_MAX, dtype=float64)
        for d in range(hs):
            acc[d] = 0.0
        m = -math.inf
        l = 0.0
        for j in range(i + 1):  # causal; online softmax, one key at a time
            s = 0.0
            for d in range(hs):
                s += q[h, i, d] * k[kh, j, d]
            s *= scale
            mnew = max(m, s)
            corr = math.exp(m - mnew)  # exp(-inf) = 0 on the first key
            p = math.exp(s - mnew)
            l = l * corr + p
            for d in range(hs):
                acc[d] = acc[d] * corr + p * v[kh, j, d]
            m = mnew
        for d in range(hs):
            out[h, i, d] = acc[d] / l
        lse[h, i] = m + math.log(l)


def _attn_bwd_dq_gpu_kernel(dout, q, k, v, out, lse, scale, G, dq, D):
    u = cuda.grid(1)
    BH, T, hs = q.shape
    if u < BH * T:
        h = u // T
        i = u - h * T
        kh = h // G
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
                s += q[h, i, d] * k[kh, j, d]
                dp += dout[h, i, d] * v[kh, j, d]
            p = math.exp(s * scale - lse[h, i])
            ds = p * (dp - Di) * scale
            for d in range(hs):
                acc[d] += ds * k[kh, j, d]
        for d in range(hs):
            dq[h, i, d] = acc[d]


def _attn_bwd_dkdv_gpu_kernel(dout, q, k, v, lse, D, scale, G, dk, dv):
    u = cuda.grid(1)
    BKV, T, hs = k.shape
    if u < BKV * T:
        kh = u // T
        j = u - kh * T
        ak = cuda.local.array(HS_MAX, dtype=float64)
        av = cuda.local.array(HS_MAX, dtype=float64)
        for d in range(hs):
            ak[d] = 0.0
            av[d] = 0.0
        for h in range(kh * G, kh * G + G):  # the query heads that share this kv head
            for i in range(j, T):  # the queries that attend to key j
                s = 0.0
                dp = 0.0
                for d in range(hs):
                    s += q[h, i, d] * k[kh, j, d]
                    dp += dout[h, i, d] * v[kh, j, d]
                p = math.exp(s * scale - lse[h, i])
                ds = p * (dp - D[h, i]) * scale
                for d in range(hs):
                    ak[d] += ds * q[h, i, d]
                    av[d] += p * dout[h, i, d]
        for d in range(hs):
            dk[kh, j, d] = ak[d]
            dv[kh, j, d] = av[d]


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
    return array_module(x).ascontiguousarray(x).reshape(B * NH, T, hs)  # NH: NKV for k, v


def _gpu_grid(n):
    return max(1, (n + ATT_THREADS - 1) // ATT_THREADS), ATT_THREADS


@register("attention_fwd", "gpu")
def attention_fwd_gpu(q, k, v):
    xp = array_module(q)
    G = group_size(q, k, v)
    B, NH, T, hs = q.shape
    out = xp.empty(q.shape, dtype=q.dtype)  # C order whatever q's strides: reshaped below
    lse = xp.empty((B, NH, T), dtype=q.dtype)
    _gpu()["fwd"][_gpu_grid(B * NH * T)](_gpu_heads(q), _gpu_heads(k), _gpu_heads(v),
                                         1 / math.sqrt(hs), G, out.reshape(B * NH, T, hs),
                                         lse.reshape(B * NH, T))
    return out, lse


@register("attention_bwd", "gpu")
def attention_bwd_gpu(dout, q, k, v, out, lse):
    xp = array_module(q)
    G = group_size(q, k, v)
    B, NH, T, hs = q.shape
    NKV = NH // G
    a = [_gpu_heads(x) for x in (dout, q, k, v, out)]
    l3 = xp.ascontiguousarray(lse).reshape(B * NH, T)
    dq = xp.empty(q.shape, dtype=q.dtype)
    dk, dv = (xp.empty(k.shape, dtype=q.dtype) for _ in range(2))
    D = xp.empty((B * NH, T), dtype=q.dtype)
    scale = 1 / math.sqrt(hs)
    kern = _gpu()
    kern["dq"][_gpu_grid(B * NH * T)](*a, l3, scale, G, dq.reshape(B * NH, T, hs), D)
    kern["dkdv"][_gpu_grid(B * NKV * T)](a[0], a[1], a[2], a[3], l3, D, scale, G,
                                          dk.reshape(B * NKV, T, hs), dv.reshape(B * NKV, T, hs))
    return dq, dk, dv


def gpu_kernels_for_ptx():
    """(name, python function, float32 signature) of each GPU kernel, for compile_ptx checks."""
    from numba import float32, int64, void
    load_cuda(globals())
    t3, t2 = float32[:, :, ::1], float32[:, ::1]
    return [
        ("attention_fwd", _attn_fwd_gpu_kernel, void(t3, t3, t3, float64, int64, t3, t2)),
        ("attention_bwd_dq", _attn_bwd_dq_gpu_kernel,
         void(t3, t3, t3, t3, t3, t2, float64, int64, t3, t2)),
        ("attention_bwd_dkdv", _attn_bwd_dkdv_gpu_kernel,
         void(t3, t3, t3, t3, t2, t2, float64, int64, t3, t3)),
    ]


# "cpu" = cpu_gemm (v4 in the log: the fastest, ~1.6x faster than cpu_blas and faster than
# PyTorch's SDPA); it falls back to cpu_blas where NumPy's BLAS is not an OpenBLAS it can call.
# Plain, flash and blas live in kernels/lab/attention.py, whose VARIANTS extends this one.
register("attention_fwd", "cpu")(attention_fwd_cpu_gemm)
register("attention_bwd", "cpu")(attention_bwd_cpu_gemm)

VARIANTS = {  # this file's; the family's whole table (the lab's too): kernels.lab.attention.VARIANTS
    "attention_fwd": {"ref": attention_fwd_ref, "cpu_gemm": attention_fwd_cpu_gemm,
                      "gpu": attention_fwd_gpu},
    "attention_bwd": {"ref": attention_bwd_ref, "cpu_gemm": attention_bwd_cpu_gemm,
                      "gpu": attention_bwd_gpu},
}


if __name__ == "__main__":
    import sys
    B, NH, T, hs = 8, 6, 256, 64
    NKV = int(sys.argv[sys.argv.index("--nkv") + 1]) if "--nkv" in sys.argv else NH  # GQA: --nkv 2
    rng = np.random.default_rng(0)
    q_, d_ = (rng.standard_normal((B, NH, T, hs)).astype(np.float32) for _ in range(2))
    k_, v_ = (rng.standard_normal((B, NKV, T, hs)).astype(np.float32) for _ in range(2))
    o_, l_ = attention_fwd_ref(q_, k_, v_)
    main_check(VARIANTS, {
        "attention_fwd": (lambda xp: tuple(xp.asarray(a) for a in (q_, k_, v_)), ()),
        "attention_bwd": (lambda xp: tuple(xp.asarray(a) for a in (d_, q_, k_, v_, o_, l_)), ()),
    }, repeats=3)
