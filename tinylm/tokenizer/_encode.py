"""Numba kernel of BPE encoding: pre-tokenize, look each pre-token up in a cache, else merge.

Merging follows GPT-2 (openai/gpt-2 ``encoder.py`` ``bpe()``) and HF's BPE model: repeatedly
merge the adjacent pair with the lowest merge rank, the leftmost one on ties, until no adjacent
pair has a rank. Ranks live in an open-addressing table keyed by the packed pair
``left << 32 | right``; a word of n bytes costs O(n) lookups per merge, O(n^2) in all, which is
what GPT-2 does too and fastest for words of tens of bytes; pre-tokens longer than LONG_WORD
bytes (a 1 MB line of base64, a run of 100 k spaces) take an O(n log n) heap path instead.

Cache: pre-token bytes -> ids, in fixed-size arrays owned by the tokenizer (131 k entries,
~19 MB, zero pages the OS maps in as used), cleared when full; pre-tokens longer than ``CACHE_MAX_LEN`` bytes are never cached.
Natural text repeats its pre-tokens: 12 MB of Python source has 3.3 M pre-tokens, 50 k
distinct. (A 32 k-entry cache kept filling and clearing on it: 35 MB/s for this kernel against
49 MB/s with 131 k, measured in one session.)

``encode_all`` is the entry point: it runs ``encode_kernel`` and, for each pre-token longer
than LONG_WORD, ``bpe_long_into``. Measured on 12 MB of stdlib source (benchmarks/tokenizer.py,
2 cores): 2.9x tiktoken's speed built from the same vocab, identical ids.

Left out: dropout, and any parallelism (one call, one thread, as the benchmark compares).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from tinylm.tokenizer._pretok import FASTMATH, fnv1a, next_token

NO_RANK = np.int64(1) << 62
CACHE_MAX_LEN = 64
LONG_WORD = 128  # longer pre-tokens take the O(n log n) path (_bpe_long)
LONG_FOUND = 1


@njit(cache=True, fastmath=FASTMATH, no_cpython_wrapper=True)
def _rslot(key, mask):
    return ((key * np.int64(-7046029254386353131)) >> 24) & mask


@njit(cache=True, fastmath=FASTMATH)
def build_rank_table(ma, mb, mres):
    """Pair -> (rank, result id) table for merges ``(ma[r], mb[r]) -> mres[r]``.

    A pair listed twice keeps its last rank, as GPT-2's ``dict(zip(merges, range(...)))`` and
    HF's map do. Example: ma=[0], mb=[1], mres=[256] -> lookup(0, 1) == (0, 256).
    """
    size = 64
    while size < 2 * len(ma) + 2:
        size *= 2
    keys = np.empty(size, np.int64)
    for s in range(size):
        keys[s] = -1
    vals = np.zeros(size, np.int64)
    mask = size - 1
    for r in range(len(ma)):
        key = (np.int64(ma[r]) << 32) | np.int64(mb[r])
        s = _rslot(key, mask)
        while keys[s] >= 0 and keys[s] != key:
            s = (s + 1) & mask
        keys[s] = key
        vals[s] = (np.int64(r) << 32) | np.int64(mres[r])
    return keys, vals


@njit(cache=True, fastmath=FASTMATH, no_cpython_wrapper=True)
def _lookup(keys, vals, x, y):
    key = (np.int64(x) << 32) | np.int64(y)
    mask = len(keys) - 1
    s = _rslot(key, mask)
    while True:
        k = keys[s]
        if k == key:
            return vals[s]
        if k < 0:
            return NO_RANK
        s = (s + 1) & mask


@njit(cache=True, fastmath=FASTMATH, no_cpython_wrapper=True)
def _bpe(buf, i, j, byte_to_id, keys, vals, syms, rk):
    """Merge the bytes buf[i:j] into syms[:n]; returns n. ``rk[k]`` = packed rank of pair k.

    Example with merges (a, b) -> X rank 0, (X, c) -> Y rank 1 on "abc": ranks [0, -], merge
    at 0 -> [X, c], ranks [1] -> [Y], n = 1.
    """
    n = j - i
    for k in range(n):
        syms[k] = byte_to_id[buf[i + k]]
    for k in range(n - 1):
        rk[k] = _lookup(keys, vals, syms[k], syms[k + 1])
    while n > 1:
        best = NO_RANK
        at = -1
        for k in range(n - 1):
            if rk[k] < best:  # packed (rank << 32 | id): the rank decides; strict <: leftmost
                best = rk[k]
                at = k
        if at < 0:
            break
        syms[at] = best & 0xFFFFFFFF
        for k in range(at + 1, n - 1):
            syms[k] = syms[k + 1]
            rk[k] = rk[k + 1]
        n -= 1
        if at > 0:
            rk[at - 1] = _lookup(keys, vals, syms[at - 1], syms[at])
        if at < n - 1:
            rk[at] = _lookup(keys, vals, syms[at], syms[at + 1])
    return n


@njit(cache=True, fastmath=FASTMATH, no_cpython_wrapper=True)
def _bpe_long(buf, i, j, byte_to_id, keys, vals, syms):
    """``_bpe`` in O(n log n) for long pre-tokens: a linked list of symbols and a min-heap of
    (rank << 32 | position), HF's ``Word::merge_all`` scheme. Popping the lowest rank, leftmost
    first, merges exactly what ``_bpe`` merges: a pair created by a merge always has a higher
    rank than the merge that created it. Stale entries (position merged away, or its pair
    changed) are skipped. Returns n; the result is in syms[:n].
    """
    n = j - i
    nxt = np.empty(n, np.int64)
    prv = np.empty(n, np.int64)
    heap = np.empty(3 * n + 1, np.int64)
    hn = 0
    for k in range(n):
        syms[k] = byte_to_id[buf[i + k]]
        nxt[k] = k + 1 if k + 1 < n else -1
        prv[k] = k - 1
    for k in range(n - 1):
        r = _lookup(keys, vals, syms[k], syms[k + 1])
        if r != NO_RANK:
            hn = _minheap_push(heap, hn, ((r >> 32) << 32) | k)
    while hn > 0:
        top = heap[0]
        hn = _minheap_pop(heap, hn)
        pos = top & 0xFFFFFFFF
        if syms[pos] < 0 or nxt[pos] < 0:
            continue  # merged away, or now the last symbol
        r = _lookup(keys, vals, syms[pos], syms[nxt[pos]])
        if r == NO_RANK or (r >> 32) != (top >> 32):
            continue  # the pair here changed since the entry was pushed
        q = nxt[pos]
        syms[pos] = r & 0xFFFFFFFF
        syms[q] = -1
        nxt[pos] = nxt[q]
        if nxt[q] >= 0:
            prv[nxt[q]] = pos
        if prv[pos] >= 0:
            r2 = _lookup(keys, vals, syms[prv[pos]], syms[pos])
            if r2 != NO_RANK:
                hn = _minheap_push(heap, hn, ((r2 >> 32) << 32) | prv[pos])
        if nxt[pos] >= 0:
            r2 = _lookup(keys, vals, syms[pos], syms[nxt[pos]])
            if r2 != NO_RANK:
                hn = _minheap_push(heap, hn, ((r2 >> 32) << 32) | pos)
    m = 0
    for k in range(n):
        if syms[k] >= 0:
            syms[m] = syms[k]
            m += 1
    return m


@njit(cache=True, fastmath=FASTMATH, no_cpython_wrapper=True)
def _minheap_push(h, n, x):
    i = n
    while i > 0:
        p = (i - 1) >> 1
        if h[p] <= x:
            break
        h[i] = h[p]
        i = p
    h[i] = x
    return n + 1


@njit(cache=True, fastmath=FASTMATH, no_cpython_wrapper=True)
def _minheap_pop(h, n):
    n -= 1
    x = h[n]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and h[c + 1] < h[c]:
            c += 1
        if h[c] >= x:
            break
        h[i] = h[c]
        i = c
    if n > 0:
        h[i] = x
    return n


def new_cache(entries=1 << 17, byte_cap=1 << 22):
    """Empty cache: (slots, hashes, byte start, byte len, id start, id len, bytes, ids, sizes).

    Room for half as many ids as bytes: after 12 MB of Python source the cache held 96 k ids
    for 373 k bytes (measured). Whichever pool fills first clears the cache, so the ratio
    only affects how often that happens, never the ids.
    """
    return (np.full(2 * entries, -1, np.int64), np.zeros(entries, np.int64), np.zeros(entries, np.int64),
            np.zeros(entries, np.int64), np.zeros(entries, np.int64), np.zeros(entries, np.int64),
            np.zeros(byte_cap, np.uint8), np.zeros(byte_cap // 2, np.int32), np.zeros(3, np.int64))


@njit(cache=True, fastmath=FASTMATH)
def encode_kernel(buf, doc_ends, spans, table, byte_to_id, keys, vals, cache, out, doc_out, pos):
    """Write the ids of every pre-token of every document into ``out`` (len(buf) is enough: a
    token covers >= 1 byte) and where each document's ids end into ``doc_out``.

    Pre-tokens: ``spans`` (their ends, from `regex`) when it is non-empty, else the GPT-2
    scanner run over each document buf[doc_ends[d-1]:doc_ends[d]].
    ``pos`` = [document, byte, span index, out offset, end of a long pre-token]: where to
    start, and where it stopped. Returns 0 when done (pos[3] = ids written), or LONG_FOUND
    when buf[pos[1]:pos[4]] is longer than LONG_WORD bytes: the caller merges it with
    ``bpe_long_into`` and calls again from pos[4]. (So ``_bpe_long``, rarely needed, is only
    compiled when first needed: it was a quarter of this kernel's first-run compile, 1.3 s of
    CPU of 5.2, measured.)
    """
    cslots, chash, cbst, cblen, cist, cilen, cbytes, cids, csz = cache
    cmask = len(cslots) - 1
    syms = np.empty(LONG_WORD, np.int64)
    rk = np.empty(LONG_WORD, np.int64)
    o = pos[3]
    t = pos[2]
    use_spans = len(spans) > 0
    for d in range(pos[0], len(doc_ends)):
        end = doc_ends[d]
        i = pos[1] if d == pos[0] else (doc_ends[d - 1] if d > 0 else 0)
        while i < end:
            if use_spans:
                j = spans[t]
                t += 1
            else:
                j = next_token(buf, i, end, table)
            n = j - i
            if n > LONG_WORD:
                pos[0], pos[1], pos[2], pos[3], pos[4] = d, i, t, o, j
                return LONG_FOUND
            if n == 1:
                out[o] = byte_to_id[buf[i]]
                o += 1
                i = j
                continue
            cacheable = n <= CACHE_MAX_LEN
            if cacheable:
                h = fnv1a(buf, i, j)
                s = h & cmask
                hit = -1
                while cslots[s] >= 0:
                    e = cslots[s]
                    if chash[e] == h and cblen[e] == n:
                        bst = cbst[e]
                        same = True
                        for k in range(n):
                            if cbytes[bst + k] != buf[i + k]:
                                same = False
                                break
                        if same:
                            hit = e
                            break
                    s = (s + 1) & cmask
                if hit >= 0:
                    ist = cist[hit]
                    for k in range(cilen[hit]):
                        out[o + k] = cids[ist + k]
                    o += cilen[hit]
                    i = j
                    continue
            m = _bpe(buf, i, j, byte_to_id, keys, vals, syms, rk)
            for k in range(m):
                out[o + k] = syms[k]
            o += m
            # a pre-token bigger than an empty cache's pools is not cached (only tiny caches)
            if cacheable and n <= len(cbytes) and m <= len(cids):
                ne, bu, iu = csz[0], csz[1], csz[2]
                if 2 * (ne + 1) > len(cslots) or ne >= len(chash) or bu + n > len(cbytes) or iu + m > len(cids):
                    for k in range(len(cslots)):  # full: start over (cheap, rare)
                        cslots[k] = -1
                    ne, bu, iu = 0, 0, 0
                    s = h & cmask
                cslots[s] = ne
                chash[ne], cbst[ne], cblen[ne], cist[ne], cilen[ne] = h, bu, n, iu, m
                for k in range(n):
                    cbytes[bu + k] = buf[i + k]
                for k in range(m):
                    cids[iu + k] = syms[k]
                csz[0], csz[1], csz[2] = ne + 1, bu + n, iu + m
            i = j
        doc_out[d] = o
    pos[3] = o
    return 0


@njit(cache=True, fastmath=FASTMATH)
def bpe_long_into(buf, i, j, byte_to_id, keys, vals, out, o):
    """Merge the long pre-token buf[i:j] into out[o:]; returns the new end of out."""
    syms = np.empty(j - i, np.int64)
    m = _bpe_long(buf, i, j, byte_to_id, keys, vals, syms)
    for k in range(m):
        out[o + k] = syms[k]
    return o + m


def encode_all(buf, doc_ends, spans, table, byte_to_id, keys, vals, cache):
    """(ids, end of each document's ids): ``encode_kernel`` run to the end."""
    out = np.empty(len(buf), np.int32)
    doc_out = np.zeros(len(doc_ends), np.int64)
    pos = np.zeros(5, np.int64)
    while encode_kernel(buf, doc_ends, spans, table, byte_to_id, keys, vals, cache, out, doc_out, pos) == LONG_FOUND:
        pos[3] = bpe_long_into(buf, pos[1], pos[4], byte_to_id, keys, vals, out, pos[3])
        pos[1] = pos[4]
    return out[:pos[3]], doc_out


