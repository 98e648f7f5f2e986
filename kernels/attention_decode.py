"""Attention of a few new queries over a KV cache (generation): forward only.

Math (per batch b, query head h with kv head h // G, G = NH / NKV; scale = 1/sqrt(hs)):
    the Tn new queries sit at positions start .. start+Tn-1 of a sequence whose keys and
    values 0 .. start+Tn-1 are cached (L = start + Tn of them); query i may see keys j <= start+i
    S = scale * q K^T (Tn, L),  P = softmax(S masked),  out = P V
Shapes: q (B, NH, Tn, hs); K, V (B, NKV, L, hs); out (B, NH, Tn, hs). ``start`` is one int
for every row, or an int array (B,) when the rows of a batch sit at different positions (a
server decoding many requests together); then L = max(start) + Tn and each row's keys past
its own start + t are masked.

Grouped-query attention costs nothing extra here: the G query heads that share a kv head are
stacked as G*Tn rows of one product, (B, NKV, G*Tn, hs) @ (B, NKV, hs, L), so K and V are read
once per kv head and never repeated.

One implementation serves every backend: the products are ``xp.matmul`` (BLAS on the CPU,
cuBLAS through CuPy on the GPU) and the softmax is a few array expressions over a (G*Tn, L)
tile, which for a single new token is one row per head: there is nothing for a hand-written
loop to fuse. Registered as "ref", "cpu" and "gpu", one function. No autograd: the
training forward (T queries over their own T keys) is kernels/attention.py, with a backward.

Where it runs: the prompt's prefill over a cache (Tn > 1), the GPU, and any step the fused
one-token path declines. The one-token CPU step (Tn = 1, generation's hot loop) attends inside
kernels/decode.py's fused block kernel instead (the same math, one (row, head) per iteration,
written into the cache there), so this function is not called per generated token on the CPU.

Leaves out: a backward, paged caches, per-row lengths.
"""
from __future__ import annotations

import math

import numpy as np

from kernels._common import array_module
from kernels.registry import register


def attention_decode_ref(q, K, V, start):  # (B,NH,Tn,hs), (B,NKV,L,hs) x2, int or (B,) -> (B,NH,Tn,hs)
    xp = array_module(q)
    B, NH, Tn, hs = q.shape
    NKV, L = K.shape[1], K.shape[2]
    per_row = not isinstance(start, (int, np.integer))
    last = int(start.max()) if per_row else start
    if NH % NKV or L != last + Tn:
        raise ValueError(f"attention_decode: q {q.shape} and cached K {K.shape} at start={start} do not fit")
    G = NH // NKV
    qg = xp.ascontiguousarray(q).reshape(B, NKV, G * Tn, hs)      # head h = kv * G + g
    s = (qg @ K.swapaxes(-1, -2)) * q.dtype.type(1.0 / math.sqrt(hs))  # (B, NKV, G*Tn, L)
    t = xp.arange(G * Tn) % Tn  # row r of a head group is query t = r % Tn
    if per_row:  # batch row b's query t is at position start[b] + t: it sees keys j <= that
        pos = xp.asarray(start)[:, None] + t[None, :]                      # (B, G*Tn)
        allowed = xp.arange(L)[None, None, :] <= pos[:, :, None]           # (B, G*Tn, L)
        s = xp.where(allowed[:, None], s, -xp.inf)
    elif Tn > 1:  # query t at position start + t sees keys j <= start + t
        allowed = xp.arange(L)[None, :] <= (start + t)[:, None]
        s = xp.where(allowed, s, -xp.inf)
    s -= s.max(axis=-1, keepdims=True)
    p = xp.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ V).reshape(B, NH, Tn, hs)


register("attention_decode", "ref")(attention_decode_ref)
register("attention_decode", "cpu")(attention_decode_ref)  # BLAS products; nothing to fuse
register("attention_decode", "gpu")(attention_decode_ref)  # the same expressions on CuPy arrays

VARIANTS = {"attention_decode": {"ref": attention_decode_ref, "cpu": attention_decode_ref, "gpu": attention_decode_ref}}


if __name__ == "__main__":  # check (trivially: one function) and time a decode step at config M
    import time

    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 6, 1, 64)).astype(np.float32)
    K, V = (rng.standard_normal((1, 2, 200, 64)).astype(np.float32) for _ in range(2))
    attention_decode_ref(q, K, V, 199)
    t = time.perf_counter()
    for _ in range(200):
        attention_decode_ref(q, K, V, 199)
    print(f"attention_decode 1 token over 200 cached, NH=6 NKV=2 hs=64: {(time.perf_counter() - t) / 200 * 1e6:.1f} us")
