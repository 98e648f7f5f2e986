"""Numba hot loops over UTF-8 bytes: character classes, word hashes, n-gram counts, MinHash.

Shape legend: N bytes of UTF-8, W words, K permutations, B bands, R rows per band.

**Words.** ``word_hashes`` scans UTF-8 bytes once: a word is a maximal run of ASCII letters,
digits, ``_`` or non-ASCII letters; ASCII is case-folded; each word gets a 64-bit FNV-1a hash.
The same scan feeds the repeated-n-gram filter (``top_ngram_fraction``) and MinHash, and
``symbol_counts`` shares its character classes (non-ASCII punctuation: U+0080-U+00BF,
U+2000-U+207F, U+3000-U+303F, U+FFFD; every other non-ASCII code point counts as a letter, so
these classes are coarser than Unicode's: a deliberate trade for one byte-level pass).

**MinHash** (Broder 1997, "On the resemblance and containment of documents"). Shingles are
``ngram`` consecutive words (a document with fewer words is one shingle). Permutation ``k`` is
the splitmix64 finaliser of ``shingle ^ seed_k``, a cheap 64-bit mixer, in place of the
textbook ``(a*x + b) mod p`` (which needs 128-bit products for 64-bit shingles); the signature
keeps the top 32 bits of each minimum, so P[sig_i == sig_j] = Jaccard + ~2^-32.

Measured on kjv-old-testament.txt (3.2 MB, 613k words, one call, warm): word_hashes 61 ms,
symbol_counts 20 ms, top_ngram_fraction (n=3) 80 ms, minhash K=128 28 ms (the
inner loop over K vectorises: ~2.8 billion mixes/s).

Leaves out: Unicode-aware case folding (only ASCII is folded) and word segmentation for
scripts without spaces (a run of CJK characters is one word).
"""
from __future__ import annotations

import numpy as np
from numba import njit

# one set of fastmath flags for every kernel: no nnan/ninf, so NaN/inf checks keep working
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

# The constants below are the hash functions themselves, never settings, so Numba freezing
# them is what we want. dedup.py's kernels inline _mix: Numba's cache keys on the defining
# file only, so an edit to _mix needs tinylm/data/__pycache__/dedup.*.nb* cleared.

_U64_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _mix(z):
    # splitmix64 finaliser; every operand is uint64 (mixing in an int64 would make Numba
    # promote to float64 and silently lose bits)
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _char_class(buf, i):
    """-> (class, length) of the UTF-8 sequence at i; class 0 space, 1 symbol, 2 word."""
    b = buf[i]
    n = buf.shape[0]
    if b < 0x80:
        if b == 32 or (9 <= b <= 13):
            return 0, 1
        if (48 <= b <= 57) or (65 <= b <= 90) or (97 <= b <= 122) or b == 95:
            return 2, 1
        return 1, 1
    length = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
    if b < 0xC0:  # stray continuation byte (only in invalid text): one symbol byte
        return 1, 1
    if i + length > n:
        return 1, n - i
    b1 = buf[i + 1]
    if b == 0xC2:                               # U+0080-U+00BF: Latin-1 punctuation
        return 1, length
    if b == 0xE2 and (b1 == 0x80 or b1 == 0x81):  # U+2000-U+207F: general punctuation
        return 1, length
    if b == 0xE3 and b1 == 0x80:                # U+3000-U+303F: CJK punctuation
        return 1, length
    if b == 0xEF and b1 == 0xBF and buf[i + 2] == 0xBD:  # U+FFFD replacement character
        return 1, length
    return 2, length


@njit(cache=True, fastmath=FASTMATH)
def symbol_counts(buf):  # uint8[N] -> (non-space characters, symbol characters)
    i = 0
    nonspace = 0
    symbols = 0
    n = buf.shape[0]
    while i < n:
        cls, length = _char_class(buf, i)
        if cls != 0:
            nonspace += 1
            if cls == 1:
                symbols += 1
        i += length
    return nonspace, symbols


@njit(cache=True, fastmath=FASTMATH)
def word_hashes(buf):  # uint8[N] -> uint64[W] hashes, int64[W] lengths in characters
    n = buf.shape[0]
    hashes = np.empty(n // 2 + 1, dtype=np.uint64)
    lengths = np.empty(n // 2 + 1, dtype=np.int64)
    w = 0
    h = _FNV_OFFSET
    chars = 0
    i = 0
    while i < n:
        cls, length = _char_class(buf, i)
        if cls == 2:
            for j in range(i, i + length):
                b = buf[j]
                if 65 <= b <= 90:
                    b += 32  # ASCII case fold
                h = (h ^ np.uint64(b)) * _FNV_PRIME
            chars += 1
        elif chars > 0:
            hashes[w] = h
            lengths[w] = chars
            w += 1
            h = _FNV_OFFSET
            chars = 0
        i += length
    if chars > 0:
        hashes[w] = h
        lengths[w] = chars
        w += 1
    return hashes[:w], lengths[:w]


@njit(cache=True, fastmath=FASTMATH)
def _shingles(hashes, ngram):  # uint64[W] -> uint64[max(W - ngram + 1, 1)]
    w = hashes.shape[0]
    m = max(w - ngram + 1, 1)
    out = np.empty(m, dtype=np.uint64)
    for s in range(m):
        h = np.uint64(0)
        for j in range(s, min(s + ngram, w)):
            h = _mix(h ^ hashes[j]) + _GOLDEN  # order-sensitive combine
        out[s] = h
    return out


@njit(cache=True, fastmath=FASTMATH)
def top_ngram_fraction(hashes, lengths, ngram):
    """count x characters of the most frequent word n-gram / all word characters (0 if W < n).

    ``hashes``: uint64[W], ``lengths``: int64[W] (from ``word_hashes``). Overlapping
    occurrences count each time ("a a a a a" gives 3 x 3 / 5 for n = 3), a slight overestimate
    of Gopher's "share of characters in the most frequent n-gram" that only matters for
    degenerate text, which the filter drops either way. Counted in an open-addressing table,
    O(W): 0.08 s on the KJV Old Testament (613k words, load 4 on 2 cores), where np.sort of
    the same hashes alone took 0.06 s and argsort plus a run scan 0.10-0.17 s.
    """
    w = hashes.shape[0]
    if w < ngram:
        return 0.0
    grams = _shingles(hashes, ngram)
    m = grams.shape[0]
    cap = 1
    while cap < 2 * m:
        cap *= 2
    mask = np.uint64(cap - 1)
    keys = np.zeros(cap, dtype=np.uint64)
    counts = np.zeros(cap, dtype=np.int64)
    first = np.zeros(cap, dtype=np.int64)
    best_count = 0
    best_first = 0
    for s in range(m):
        g = grams[s]
        if g == 0:
            g = np.uint64(1)  # 0 marks an empty slot
        i = _mix(g) & mask
        while keys[i] != 0 and keys[i] != g:
            i = (i + np.uint64(1)) & mask
        if keys[i] == 0:
            keys[i] = g
            first[i] = s
        counts[i] += 1
        if counts[i] > best_count:
            best_count = counts[i]
            best_first = first[i]
    chars = 0
    for j in range(best_first, best_first + ngram):
        chars += lengths[j]
    total = 0
    for j in range(w):
        total += lengths[j]
    return best_count * chars / total


@njit(cache=True, fastmath=FASTMATH)
def minhash(hashes, ngram, seeds):  # uint64[W], int, uint64[K] -> uint32[K]
    shingles = _shingles(hashes, ngram)
    k = seeds.shape[0]
    mins = np.full(k, _U64_MAX, dtype=np.uint64)
    for s in range(shingles.shape[0]):
        x = shingles[s]
        for p in range(k):  # independent lanes: vectorises
            v = _mix(x ^ seeds[p])
            if v < mins[p]:
                mins[p] = v
    out = np.empty(k, dtype=np.uint32)
    for p in range(k):
        out[p] = np.uint32(mins[p] >> _S32)
    return out


@njit(cache=True, fastmath=FASTMATH)
def band_keys(sig, bands, rows):  # uint32[K] -> uint64[B], band index mixed in
    out = np.empty(bands, dtype=np.uint64)
    for b in range(bands):
        h = _mix(np.uint64(b) + _GOLDEN)
        for r in range(b * rows, (b + 1) * rows):
            h = _mix(h ^ np.uint64(sig[r]))
        out[b] = h
    return out


def text_words(text: str):
    """UTF-8 encode and hash the words of ``text`` -> (hashes uint64[W], lengths int64[W])."""
    return word_hashes(np.frombuffer(text.encode("utf-8"), dtype=np.uint8))


def make_seeds(num_perm: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([0x5EED, seed]).integers(0, 2**63, size=num_perm, dtype=np.uint64) * 2 + 1


def shingle_set(text: str, ngram: int) -> np.ndarray:
    """Sorted unique 64-bit hashes of the ``ngram``-word shingles of ``text``."""
    return np.unique(_shingles(text_words(text)[0], ngram))
