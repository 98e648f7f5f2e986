"""Numba pre-tokenizer for the GPT-2 split pattern, over UTF-8 bytes, and a pre-token counter.

``regex.findall(GPT2_PATTERN, text)`` alone runs at 8.5-9 MB/s on this machine kind
(docs/performance.md, "Tokenizer reference points"), slower than tiktoken's whole encode, so
the default pattern gets a hand-written matcher. It reads UTF-8 bytes (no str objects per
pre-token), decodes one code point at a time and classifies it with a 1.1 M-entry table built
*from the `regex` package itself* at first use (22 ms), so \\p{L}, \\p{N} and \\s mean exactly
what they mean to the installed `regex`.

The pattern, and how ``next_token`` follows it (alternatives are tried in order):
``'s|'t|'re|'ve|'m|'ll|'d`` (case-sensitive), `` ?\\p{L}+``, `` ?\\p{N}+``,
`` ?[^\\s\\p{L}\\p{N}]+``, ``\\s+(?!\\S)`` (a run of whitespace, minus its last character when a
non-space follows, so " word" keeps its space), ``\\s+``.
Bytes that are not valid UTF-8 (only possible through ``encode_bytes``) count as one
"other" character each, exactly as if decoded with ``errors="surrogateescape"`` and matched by
`regex` (lone surrogates are neither letters, numbers nor space).

Speed: ~120-150 MB/s for the scanner alone on 12 MB of Python source (regex.findall: 9).
Tests check spans against ``regex`` on Hypothesis text. Other patterns do not come here: they
use `regex` in Python (``bpe.py``). Left out: the GPT-4 (cl100k) pattern.
"""
from __future__ import annotations

import numpy as np
from numba import njit

# The project's one flag set (kernels/_common.py): no nnan/ninf. These kernels do integer
# work only, so the flags change nothing here; they are set for uniformity.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# Helpers called only from other kernels carry no_cpython_wrapper=True, so no Python-callable
# wrapper is generated for them: the first-run compile of train + encode took 15.8 and 16.1 s
# of CPU, against 17.8 and 16.9 s with wrappers (A/B, alternated, on a loaded machine).
# Numba's cache keys each file on its own source: after editing this file, delete
# tinylm/tokenizer/__pycache__, or _encode.py and _merge.py keep compiled copies of the old
# helpers.

OTHER, LETTER, NUMBER, SPACE = 0, 1, 2, 3

# A token [i, j) is final once 16 more bytes (>= 4 code points) follow j: the pattern never
# looks further than 3 characters past a token's start or 1 past its end.
STREAM_MARGIN = 16

_TABLE = None


def class_table() -> np.ndarray:
    """uint8[0x110000]: OTHER/LETTER/NUMBER/SPACE of every code point, as `regex` sees it.

    >>> t = class_table(); int(t[ord("a")]), int(t[ord("7")]), int(t[ord(" ")]), int(t[ord("!")])
    (1, 2, 3, 0)
    """
    global _TABLE
    if _TABLE is None:
        import regex

        # every code point (surrogates included) as one str: 10 ms through utf-32
        allchars = np.arange(0x110000, dtype=np.uint32).tobytes().decode("utf-32-le", "surrogatepass")
        t = np.zeros(0x110000, np.uint8)
        for cls, pat in ((LETTER, r"\p{L}+"), (NUMBER, r"\p{N}+"), (SPACE, r"\s+")):
            for m in regex.finditer(pat, allchars):
                t[m.start():m.end()] = cls
        _TABLE = t
    return _TABLE


@njit(cache=True, fastmath=FASTMATH, no_cpython_wrapper=True)
def _is_cont(buf, k, end):
    return k < end and (buf[k] & 0xC0) == 0x80


@njit(cache=True, fastmath=FASTMATH, no_cpython_wrapper=True)
def decode_utf8(buf, i, end):
    """(code point, length) of the UTF-8 character at buf[i]; (-1, 1) for an invalid byte.

    Follows the Unicode well-formed table (no overlongs, no surrogates, <= U+10FFFF), as
    Python's decoder does. ``b"\\xe2\\x82\\xac"`` at 0 -> (0x20AC, 3); ``b"\\xff"`` -> (-1, 1).
    """
    b0 = np.int64(buf[i])
    if b0 < 0x80:
        return b0, 1
    if b0 < 0xC2:
        return -1, 1
    if b0 < 0xE0:
        if _is_cont(buf, i + 1, end):
            return ((b0 & 0x1F) << 6) | (np.int64(buf[i + 1]) & 0x3F), 2
        return -1, 1
    if b0 < 0xF0:
        if i + 1 >= end:
            return -1, 1
        b1 = np.int64(buf[i + 1])
        lo, hi = 0x80, 0xBF
        if b0 == 0xE0:
            lo = 0xA0
        elif b0 == 0xED:
            hi = 0x9F
        if b1 < lo or b1 > hi or not _is_cont(buf, i + 2, end):
            return -1, 1
        return ((b0 & 0x0F) << 12) | ((b1 & 0x3F) << 6) | (np.int64(buf[i + 2]) & 0x3F), 3
    if b0 < 0xF5:
        if i + 1 >= end:
            return -1, 1
        b1 = np.int64(buf[i + 1])
        lo, hi = 0x80, 0xBF
        if b0 == 0xF0:
            lo = 0x90
        elif b0 == 0xF4:
            hi = 0x8F
        if b1 < lo or b1 > hi or not _is_cont(buf, i + 2, end) or not _is_cont(buf, i + 3, end):
            return -1, 1
        cp = ((b0 & 0x07) << 18) | ((b1 & 0x3F) << 12) | ((np.int64(buf[i + 2]) & 0x3F) << 6)
        return cp | (np.int64(buf[i + 3]) & 0x3F), 4
    return -1, 1


@njit(cache=True, fastmath=FASTMATH, no_cpython_wrapper=True)
def _class_slow(buf, j, end, table):
    """(class, byte length) of the non-ASCII character at buf[j]."""
    cp, n = decode_utf8(buf, j, end)
    if cp < 0:
        return OTHER, n
    return np.int64(table[cp]), n


# Every loop below tests ASCII inline and calls the decoder only for other bytes. Written
# with a helper returning (class, length) for every byte, the scanner ran at 50-70 MB/s
# (15 ns a byte, measured on 12 MB of Python source); with the test inline, ~900 MB/s for
# the bare class loop.

@njit(cache=True, fastmath=FASTMATH, no_cpython_wrapper=True, inline="always")
def _run_end(buf, j, end, table, k):
    """End of the run of class-k characters starting at byte j."""
    while j < end:
        b = buf[j]
        if b < 0x80:
            if table[b] != k:
                break
            j += 1
        else:
            c, n = _class_slow(buf, j, end, table)
            if c != k:
                break
            j += n
    return j


@njit(cache=True, fastmath=FASTMATH, no_cpython_wrapper=True)
def next_token(buf, i, end, table):
    """End (exclusive) of the GPT-2 pre-token that starts at byte i of buf[:end].

    Worked example on b"  it's 42": tokens " ", " it", "'s", " 42" (a run of two spaces
    followed by a letter leaves its last space to the word).
    """
    c0 = buf[i]
    if c0 == 39 and i + 1 < end:  # "'": the contractions come first in the pattern
        c1 = buf[i + 1]
        if c1 == 115 or c1 == 116 or c1 == 109 or c1 == 100:  # s t m d
            return i + 2
        if i + 2 < end:
            c2 = buf[i + 2]
            if (c1 == 114 and c2 == 101) or (c1 == 118 and c2 == 101) or (c1 == 108 and c2 == 108):  # re ve ll
                return i + 3
    if c0 < 0x80:
        k0 = np.int64(table[c0])
        n0 = 1
    else:
        k0, n0 = _class_slow(buf, i, end, table)
    if c0 == 32 and i + 1 < end:  # " ?X+" for X in letters, numbers, other
        c1 = buf[i + 1]
        if c1 < 0x80:
            k1 = np.int64(table[c1])
            n1 = 1
        else:
            k1, n1 = _class_slow(buf, i + 1, end, table)
        if k1 != SPACE:
            return _run_end(buf, i + 1 + n1, end, table, k1)
    if k0 != SPACE:
        return _run_end(buf, i + n0, end, table, k0)
    # whitespace: \s+(?!\S) takes the run but its last character when a non-space follows
    j = i + n0
    last = i
    while j < end:
        b = buf[j]
        if b < 0x80:
            if table[b] != SPACE:
                break
            n = 1
        else:
            c, n = _class_slow(buf, j, end, table)
            if c != SPACE:
                break
        last = j
        j += n
    if j == end:
        return end
    if last > i:
        return last
    return j  # a single whitespace character before a non-space: the plain \s+ alternative


@njit(cache=True, fastmath=FASTMATH)
def gpt2_spans(buf, table):
    """Token ends of all of buf (for tests and study): int64 array, last entry len(buf)."""
    out = np.empty(len(buf), np.int64)
    n = 0
    i = 0
    end = len(buf)
    while i < end:
        i = next_token(buf, i, end, table)
        out[n] = i
        n += 1
    return out[:n]


# ---- counting distinct pre-tokens (training) ------------------------------------------------
# A word table: byte pool + (start, length, count) per word + open-addressing slots keyed by a
# 64-bit FNV-1a hash of the bytes. The kernels never allocate: when the table is full they
# return NEED_ROOM with their position, Python grows the arrays (``WordTable.grow``) and calls
# again. Growing inside the kernels (np.full, a _grow per dtype) cost ~5 s of first-run
# compile under load for _add_word alone, against ~0.6 s for this version (measured).

NEED_ROOM = 1


@njit(cache=True, fastmath=FASTMATH, no_cpython_wrapper=True)
def fnv1a(buf, i, j):
    """64-bit FNV-1a of buf[i:j], as int64 (wrapping multiply: the same bits as uint64)."""
    h = np.int64(-3750763034362895579)  # 0xCBF29CE484222325
    for k in range(i, j):
        h = (h ^ np.int64(buf[k])) * np.int64(0x100000001B3)
    return h


@njit(cache=True, fastmath=FASTMATH)
def rehash(slots, hashes, n):
    """Refill open-addressing ``slots`` (all -1, size a power of 2) with entries 0..n-1."""
    mask = len(slots) - 1
    for w in range(n):
        s = hashes[w] & mask
        while slots[s] >= 0:
            s = (s + 1) & mask
        slots[s] = w


class WordTable:
    """Distinct byte strings with counts: ``pool[wstart[w]:wstart[w] + wlen[w]]`` is word w."""

    def __init__(self, cap: int = 1 << 14):
        self.slots = np.full(2 * cap, -1, np.int64)
        self.hashes = np.zeros(cap, np.int64)
        self.pool = np.zeros(cap * 8, np.uint8)
        self.wstart = np.zeros(cap, np.int64)
        self.wlen = np.zeros(cap, np.int64)
        self.wcount = np.zeros(cap, np.int64)
        self.sizes = np.zeros(2, np.int64)  # words, pool bytes used
        self.pos = np.zeros(4, np.int64)    # kernel resume point: doc, byte, stop, bytes needed

    def arrays(self):
        return self.slots, self.hashes, self.pool, self.wstart, self.wlen, self.wcount, self.sizes

    def grow(self) -> None:
        n, used = int(self.sizes[0]), int(self.sizes[1])
        if n + 1 >= len(self.wstart):
            cap = 2 * len(self.wstart)
            for name in ("hashes", "wstart", "wlen", "wcount"):
                a = getattr(self, name)
                b = np.zeros(cap, a.dtype)
                b[:n] = a[:n]
                setattr(self, name, b)
        if len(self.slots) < 2 * len(self.wstart):  # load factor <= 1/2
            self.slots = np.full(2 * len(self.wstart), -1, np.int64)
            rehash(self.slots, self.hashes, n)
        if used + int(self.pos[3]) > len(self.pool):
            b = np.zeros(max(2 * len(self.pool), used + int(self.pos[3])), np.uint8)
            b[:used] = self.pool[:used]
            self.pool = b

    def words(self):
        n = int(self.sizes[0])
        return self.pool[:int(self.sizes[1])], self.wstart[:n], self.wlen[:n], self.wcount[:n]


@njit(cache=True, fastmath=FASTMATH, no_cpython_wrapper=True)
def _add_word(slots, hashes, pool, wstart, wlen, wcount, sizes, buf, i, j, cnt):
    """Add cnt to word buf[i:j]; False (and nothing changed) when a new word does not fit."""
    h = fnv1a(buf, i, j)
    mask = len(slots) - 1
    s = h & mask
    n = j - i
    while True:
        w = slots[s]
        if w < 0:
            break
        if hashes[w] == h and wlen[w] == n:
            st = wstart[w]
            same = True
            for k in range(n):
                if pool[st + k] != buf[i + k]:
                    same = False
                    break
            if same:
                wcount[w] += cnt
                return True
        s = (s + 1) & mask
    nw, used = sizes[0], sizes[1]
    if nw + 1 >= len(wstart) or 2 * (nw + 1) > len(slots) or used + n > len(pool):
        return False
    for k in range(n):
        pool[used + k] = buf[i + k]
    slots[s] = nw
    hashes[nw] = h
    wstart[nw] = used
    wlen[nw] = n
    wcount[nw] = cnt
    sizes[0] = nw + 1
    sizes[1] = used + n
    return True


@njit(cache=True, fastmath=FASTMATH)
def count_gpt2(slots, hashes, pool, wstart, wlen, wcount, sizes, pos, buf, doc_ends, last_partial, table):
    """Count the GPT-2 pre-tokens of each document buf[doc_ends[d-1]:doc_ends[d]].

    Starts at document pos[0], byte pos[1]. Returns NEED_ROOM (pos = where to resume, pos[3]
    = bytes of the word that did not fit) or 0. When ``last_partial``, the last document
    continues in the next call: tokens closer than STREAM_MARGIN bytes to its end are not
    counted and pos[2] = the byte offset where counting stopped (the caller carries buf[pos[2]:]
    over); otherwise pos[2] = len(buf).
    """
    pos[2] = len(buf)
    for d in range(pos[0], len(doc_ends)):
        end = doc_ends[d]
        i = pos[1] if d == pos[0] else (doc_ends[d - 1] if d > 0 else 0)
        partial = last_partial and d == len(doc_ends) - 1
        while i < end:
            j = next_token(buf, i, end, table)
            if partial and j + STREAM_MARGIN > end:
                pos[2] = i
                break
            if not _add_word(slots, hashes, pool, wstart, wlen, wcount, sizes, buf, i, j, 1):
                pos[0], pos[1], pos[3] = d, i, j - i
                return NEED_ROOM
            i = j
    return 0


@njit(cache=True, fastmath=FASTMATH)
def count_spans(slots, hashes, pool, wstart, wlen, wcount, sizes, pos, buf, ends, counts):
    """Add words buf[ends[k-1]:ends[k]] with counts[k] (pre-tokens found by `regex`), from
    word pos[0]; NEED_ROOM as in ``count_gpt2``."""
    for k in range(pos[0], len(ends)):
        i = ends[k - 1] if k > 0 else 0
        if not _add_word(slots, hashes, pool, wstart, wlen, wcount, sizes, buf, i, ends[k], counts[k]):
            pos[0], pos[3] = k, ends[k] - i
            return NEED_ROOM
    return 0


def count_into(table: WordTable, kernel, *args) -> None:
    """Run ``count_gpt2``/``count_spans`` to the end, growing the table when it asks."""
    table.pos[:] = 0
    while kernel(*table.arrays(), table.pos, *args) == NEED_ROOM:
        table.grow()
