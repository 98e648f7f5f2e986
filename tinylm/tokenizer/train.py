"""BPE training driver: stream text into distinct pre-tokens with counts, then run the merges.

Pass 1 (``WordCounter``) turns documents into a table of distinct pre-tokens and their counts,
never holding more than one batch of text (~1 MB) plus that table, so a corpus larger than
memory streams through (``add_stream`` takes one document in pieces, e.g. a file read in
chunks). Special tokens are cut out of the text first: they are never part of a merge.
Pass 2 (``train_merges``) runs the Numba merge kernel (``_merge.py``) in slices of 256 merges so
a tqdm bar can follow it.

Rule (the same as HF ``tokenizers``' BpeTrainer): merge the pair with the highest count; on equal
counts the pair with the smaller (left id, right id), with ids 0..255 being the bytes in GPT-2's
order (``gpt2.GPT2_BYTE_ORDER``) and merged tokens numbered 256, 257, ... in creation order.

Differences from HF's ``train_from_iterator`` with a ByteLevel pre-tokenizer (add_prefix_space
False, initial alphabet = all 256 bytes), which otherwise gives identical merges (tested; the
benchmark checks vocab 32768 on 12 MB): HF does not cut special tokens out of the training text
(tokenizers 0.23 on "hi<|endoftext|>" x 50 learns "<|" and "endoftext"); HF's trainer.rs keeps
the stale count of an already-merged pair (visible only if id reuse re-created that pair);
HF's ``train(files)`` treats every line as a document. Left out: min_frequency,
a maximum token length, an initial alphabet smaller than 256 bytes.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

from tinylm.tokenizer.gpt2 import GPT2_BYTE_ORDER, GPT2_PATTERN

BATCH_BYTES = 1 << 20
# For patterns other than GPT-2's, a stream keeps this many characters back between pieces;
# exact for any pattern that looks at most this far past a match (GPT-2's looks 3).
GENERIC_MARGIN = 16


def to_utf8(text: str) -> bytes:
    """UTF-8 bytes of ``text``; lone surrogates (not encodable) become U+FFFD, as in tiktoken.

    >>> to_utf8("h\\u00e9"), to_utf8("a\\ud800")
    (b'h\\xc3\\xa9', b'a\\xef\\xbf\\xbd')
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def regex_pieces(rx, text: str, partial: bool = False) -> tuple[list[str], int]:
    """Split ``text`` into the pattern's matches *and* the gaps between them (so nothing is lost).

    With ``partial`` (the text continues later), pieces within GENERIC_MARGIN characters of the
    end are left out. Returns (pieces, characters consumed).
    ``regex_pieces(regex.compile(r"[a-z]+"), "ab, cd")`` -> (["ab", ", ", "cd"], 6).
    """
    if not partial:
        found = rx.findall(text)
        if found and isinstance(found[0], str) and sum(map(len, found)) == len(text):
            return found, len(text)  # the common case: matches tile the text
    out = []
    pos = 0
    for m in rx.finditer(text):
        s, e = m.span()
        if partial and e + GENERIC_MARGIN > len(text):
            break
        if s > pos:
            out.append(text[pos:s])
        if e > s:
            out.append(text[s:e])
            pos = e
    if not partial and pos < len(text):
        out.append(text[pos:])
        pos = len(text)
    return out, pos


class WordCounter:
    """Distinct pre-tokens (as UTF-8 bytes) with counts, fed documents or streams of pieces."""

    def __init__(self, pattern: str = GPT2_PATTERN, special_tokens: Iterable[str] = ()):
        import regex

        from tinylm.tokenizer import _pretok

        self._pk = _pretok
        self.fast = pattern == GPT2_PATTERN
        self.rx = regex.compile(pattern)
        self.table = _pretok.class_table() if self.fast else None
        self.wt = _pretok.WordTable()
        self.counter: Counter = Counter()
        specials = sorted(set(special_tokens), key=len, reverse=True)
        self.special_rx = regex.compile("|".join(regex.escape(s) for s in specials)) if specials else None
        self._batch: list[bytes] = []
        self._batch_len = 0
        self.bytes_seen = 0

    def _split(self, text: str) -> list[str]:
        if self.special_rx is None:
            return [text]
        return self.special_rx.split(text)

    def add_text(self, text: str) -> None:
        """Count one whole document."""
        if not isinstance(text, str):
            raise TypeError(f"training text must be str, got {type(text).__name__}")
        for seg in self._split(text):
            self._add_doc(seg)

    def _add_doc(self, seg: str) -> None:
        if not seg:
            return
        if self.fast:
            b = to_utf8(seg)
            self._batch.append(b)
            self._batch_len += len(b)
            if self._batch_len >= BATCH_BYTES:
                self._flush()
        else:
            self.counter.update(regex_pieces(self.rx, seg)[0])
            self.bytes_seen += len(seg)

    def _flush(self) -> None:
        if not self._batch:
            return
        ends = np.cumsum([len(b) for b in self._batch]).astype(np.int64)
        buf = np.frombuffer(b"".join(self._batch), np.uint8)
        self._pk.count_into(self.wt, self._pk.count_gpt2, buf, ends, False, self.table)
        self.bytes_seen += len(buf)
        self._batch, self._batch_len = [], 0

    def add_stream(self, pieces: Iterable[str]) -> None:
        """Count one document that arrives in pieces (a special token must not straddle two)."""
        carry_b, carry_s = b"", ""
        for piece in pieces:
            segs = self._split(piece)
            for k, seg in enumerate(segs):
                last = k == len(segs) - 1
                if self.fast:
                    data = carry_b + to_utf8(seg)
                    carry_b = b""
                    if not last:
                        self._batch.append(data)
                        self._batch_len += len(data)
                        continue
                    buf = np.frombuffer(data, np.uint8)
                    self._pk.count_into(self.wt, self._pk.count_gpt2, buf, np.array([len(buf)], np.int64), True, self.table)
                    stop = int(self.wt.pos[2])
                    self.bytes_seen += stop
                    carry_b = data[stop:]
                else:
                    text = carry_s + seg
                    carry_s = ""
                    pieces_, used = regex_pieces(self.rx, text, partial=last)
                    self.counter.update(pieces_)
                    self.bytes_seen += used
                    carry_s = text[used:]
            if self._batch_len >= BATCH_BYTES:
                self._flush()
        if self.fast:
            if carry_b:
                self._batch.append(carry_b)
                self._batch_len += len(carry_b)
        elif carry_s:
            self.counter.update(regex_pieces(self.rx, carry_s)[0])
            self.bytes_seen += len(carry_s)

    def words(self):
        """(bytes pool, start, length, count) of the distinct pre-tokens, as NumPy arrays."""
        self._flush()
        if self.counter:
            bs = [to_utf8(w) for w in self.counter]
            ends = np.cumsum([len(b) for b in bs]).astype(np.int64)
            counts = np.fromiter(self.counter.values(), np.int64, len(bs))
            self._pk.count_into(self.wt, self._pk.count_spans, np.frombuffer(b"".join(bs), np.uint8), ends, counts)
            self.counter = Counter()
        return self.wt.words()


def train_merges(counter: WordCounter, n_tokens: int, progress: bool = True, cap: int | None = None):
    """Merges that grow the 256 bytes to ``n_tokens`` tokens (fewer if the pairs run out).

    Returns (tokens, merges): tokens[i] = bytes of id i (ids 0..255 in GPT-2 byte order),
    merges = [(left id, right id), ...] in rank order. ``cap``: see ``_merge.new_state``.
    """
    from tinylm.tokenizer import _merge

    pool, wstart, wlen, wcount = counter.words()
    byte_to_id = np.empty(256, np.int64)
    byte_to_id[np.array(GPT2_BYTE_ORDER)] = np.arange(256)
    sym = byte_to_id[pool]  # words sit back to back in the pool, in order
    tok_pool = np.array(GPT2_BYTE_ORDER, np.uint8)
    st = _merge.new_state(sym, wstart, wlen, wcount, tok_pool, np.ones(256, np.int64), n_tokens, cap)
    bar = None
    if progress and n_tokens - 256 >= 2048:
        from tqdm import tqdm

        bar = tqdm(total=n_tokens - 256, unit="tok", desc="bpe merges", leave=False)
    done = 0
    while st[11][6] == 0:
        st = _merge.train_steps(st, n_tokens, 256)
        if bar is not None:
            bar.update(int(st[11][3]) - 256 - done)
            done = int(st[11][3]) - 256
    if bar is not None:
        bar.close()
    tpool, T, M, sc = st[6], st[7], st[9], st[11]
    tpool = tpool.astype(np.uint8)  # int64 in the kernel (one dtype: less compiling)
    tokens = [tpool[s:s + n].tobytes() for s, n in zip(T[0, :int(sc[3])].tolist(), T[1, :int(sc[3])].tolist())]
    nm = int(sc[4])
    merges = list(zip(M[0, :nm].tolist(), M[1, :nm].tolist()))
    return tokens, merges
