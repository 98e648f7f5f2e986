"""Attention lab: the CPU variants kept for study and as a fallback (see kernels/lab/__init__.py).

The math, shape legend and version log are in kernels/attention.py, with the reference, the
variant that runs ("cpu" = cpu_gemm) and the GPU kernels. Here:
- "cpu_plain": the textbook algorithm per head: S (T, T) scores, row softmax, P V. Backward
  materialises P and dS (T, T). Extra memory per running head: 2 T^2 floats.
- "cpu_flash": online softmax over key tiles of BC keys (Milakov & Gimelshein; FlashAttention).
  Forward: parallel over (head, query tile of BR rows); per row a running max m, sum l and
  accumulator acc are rescaled by exp(m_old - m_new) when a tile raises the max; key/value tiles
  stay in L1 while the tile's rows pass over them. Backward: parallel over heads; for each key
  tile, every later query row recomputes its scores, P = exp(S - lse), dP = dout V^T and
  dS = P (dP - D), and adds into dq (its own row) and the tile's dk, dv. Extra memory: O(T hs)
  (the K^T and V^T copies) plus O(BR hs) per thread: it grows with T, not T^2. The variant to
  read for O(T) memory without BLAS.
- "cpu_blas": query tiles of BLAS_BR rows for all heads at once; the products go to BLAS
  (np.matmul), the causal mask, softmax and dS are fused Numba loops. Extra memory: two
  (B*NH, BR, T) tiles, so it grows with T (not T^2), but it is not online-softmax tiling.
  cpu_gemm runs it where NumPy's BLAS is not an OpenBLAS it can call (MKL, Accelerate).
Why each lost to cpu_gemm: v1-v4 of the version log in kernels/attention.py.
Grouped-query shapes (k, v with NKV < NH heads): each variant repeats k, v per group and sums
the group's dk, dv afterwards (kernels.attention.repeat_kv / sum_groups): G times the kv memory
and work, which is fine for study and for the fallback; cpu_gemm reads the shared heads in place.

``VARIANTS`` is the family's whole table (kernels.attention's extended by these three);
``python -m kernels.lab.attention`` checks every one against the reference and times it.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from kernels import attention as _family
from kernels._common import FASTMATH, main_check
from kernels._mathfn import fexp
from kernels.attention import _dot, _exp_shift, attention_fwd_ref, group_size, repeat_kv, sum_groups

# ---------------------------------------------------------------------------------------------
# Numba CPU: helpers of plain and flash (serial; each loops over 1-D slices from 0 so it
# vectorises). _dot and _exp_shift are shared with cpu_gemm and live in kernels/attention.py.

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
    G = group_size(q, k, v)
    k, v = repeat_kv(k, G), repeat_kv(v, G)
    B, NH, T, hs = q.shape
    out = np.empty(q.shape, dtype=q.dtype)  # C order whatever q's strides: reshaped below
    lse = np.empty((B, NH, T), dtype=q.dtype)
    _attn_fwd_plain(_heads(q), _transposed(_heads(k)), _heads(v), q.dtype.type(1 / math.sqrt(hs)),
                    out.reshape(B * NH, T, hs), lse.reshape(B * NH, T))
    return out, lse


def attention_fwd_cpu_flash(q, k, v, *, br=None, bc=None):  # tiles: keyword-only, for tests
    G = group_size(q, k, v)
    k, v = repeat_kv(k, G), repeat_kv(v, G)
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
    G = group_size(q, k, v)
    args, grads, views = _bwd_args(dout, q, repeat_kv(k, G), repeat_kv(v, G), out, lse)
    _attn_bwd_plain(*args, *views)
    return grads[0], sum_groups(grads[1], G), sum_groups(grads[2], G)


def attention_bwd_cpu_flash(dout, q, k, v, out, lse, *, bc=None):
    G = group_size(q, k, v)
    args, grads, views = _bwd_args(dout, q, repeat_kv(k, G), repeat_kv(v, G), out, lse)
    _attn_bwd_flash(*args, *views, bc or FLASH_BC)
    return grads[0], sum_groups(grads[1], G), sum_groups(grads[2], G)


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
    G = group_size(q, k, v)
    k, v = repeat_kv(k, G), repeat_kv(v, G)
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
    G = group_size(q, k, v)
    k, v = repeat_kv(k, G), repeat_kv(v, G)
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
    return dq.reshape(q.shape), sum_groups(dk.reshape(q.shape), G), sum_groups(dv.reshape(q.shape), G)


# ---------------------------------------------------------------------------------------------
# The family's whole table: the reference, the lab's variants, then kernels.attention's

_LAB = {
    "attention_fwd": {"cpu_plain": attention_fwd_cpu_plain, "cpu_flash": attention_fwd_cpu_flash,
                      "cpu_blas": attention_fwd_cpu_blas},
    "attention_bwd": {"cpu_plain": attention_bwd_cpu_plain, "cpu_flash": attention_bwd_cpu_flash,
                      "cpu_blas": attention_bwd_cpu_blas},
}
VARIANTS = {op: {"ref": table["ref"], **_LAB[op], **table} for op, table in _family.VARIANTS.items()}


def gpu_kernels_for_ptx():
    """The family's GPU kernels (the lab has none of its own)."""
    return _family.gpu_kernels_for_ptx()


if __name__ == "__main__":
    B, NH, T, hs = 8, 6, 256, 64
    rng = np.random.default_rng(0)
    q_, k_, v_, d_ = (rng.standard_normal((B, NH, T, hs)).astype(np.float32) for _ in range(4))
    o_, l_ = attention_fwd_ref(q_, k_, v_)
    main_check(VARIANTS, {
        "attention_fwd": (lambda xp: tuple(xp.asarray(a) for a in (q_, k_, v_)), ()),
        "attention_bwd": (lambda xp: tuple(xp.asarray(a) for a in (d_, q_, k_, v_, o_, l_)), ()),
    }, repeats=3)
