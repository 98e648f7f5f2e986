"""Tests of tinylm.tokenizer: round trips, a known answer, the fast trainer against a slow one,
the Numba pre-tokenizer against `regex`, streaming, special tokens.

Oracles: `regex.findall` for pre-tokenization; ``reference_train`` below (recounts every pair
after every merge, minbpe-style, obviously correct and slow) for the trainer. Files, GPT-2
formats, CLI: test_tokenizer_files.py; HF tokenizers / tiktoken: test_tokenizer_refs.py.
"""
import inspect
import json as json_module
import textwrap
from collections import Counter

import numpy as np
import pytest
import regex
from hypothesis import given
from hypothesis import strategies as st

from tinylm.tokenizer import GPT2_PATTERN, BPETokenizer
from tinylm.tokenizer.gpt2 import GPT2_BYTE_ORDER
from tinylm.tokenizer.train import WordCounter

# A corpus from the standard library (every install has it): real-ish code and prose.
STDLIB_TEXT = inspect.getsource(json_module.decoder) + inspect.getsource(textwrap)

# Characters that exercise every branch of the GPT-2 pattern: contractions (and near misses),
# leading spaces, runs of whitespace of several kinds, letters/numbers/marks from other
# scripts, emoji, control characters.
TRICKY = list("ab 'sStdrevlm19\n\t\r\u00a0\u2028\u3000é\u0301ß日本٣Ⅻ!?.-_\x00\x1f\x7f😀👍🏽") + ["  ", "\n\n", "'re", "'ll", "'ve"]
tricky_text = st.lists(st.sampled_from(TRICKY), max_size=40).map("".join)


@pytest.fixture(scope="module")
def shakespeare_like():
    """A tokenizer trained on the stdlib corpus (module-scoped: trained once)."""
    return BPETokenizer().train(STDLIB_TEXT, 600, progress=False)


def reference_train(text_or_texts, n_tokens, pattern=GPT2_PATTERN):
    """Slow, obviously correct BPE: recount all pairs after every merge.

    Rule: highest count; ties -> smallest (left id, right id); ids 0..255 are the bytes in GPT-2
    order. A merge whose bytes already are a token reuses that id. Returns tinylm's merges.
    """
    texts = [text_or_texts] if isinstance(text_or_texts, str) else text_or_texts
    words = Counter(w.encode() for t in texts for w in regex.findall(pattern, t))
    tokens = [bytes([b]) for b in GPT2_BYTE_ORDER]
    index = {t: i for i, t in enumerate(tokens)}
    seqs = {w: [index[bytes([c])] for c in w] for w in words}
    merges = []
    while len(tokens) < n_tokens:
        counts = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                counts[pair] += words[w]
        if not counts:
            break
        a, b = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        joined = tokens[a] + tokens[b]
        if joined not in index:
            index[joined] = len(tokens)
            tokens.append(joined)
        res = index[joined]
        merges.append((a, b))
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(res)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


# ---- the known answer -----------------------------------------------------------------------

def test_known_answer_aaabdaaabac():
    """"aaabdaaabac" (Wikipedia's BPE example) is one GPT-2 pre-token. Ids: a=64, b=65, c=66,
    d=67 (GPT-2 order puts "!" at 0, so byte x is id x-33 for printable ASCII).

    Pairs (overlapping, as BPE counts them): aa 4 (positions 0,1,5,6), ab 2, bd 1, da 1, ba 1,
    ac 1. Merge 1: (a, a) -> 256 "aa"; left to right "aaab" -> [aa, a, b], so the word is
    aa a b d aa a b a c. Now (aa, a) 2 and (a, b) 2 tie: the smaller pair (64, 65) < (256, 64)
    wins: merge 2: (a, b) -> 257 "ab": aa ab d aa ab a c. Merge 3: (aa, ab) 2 -> 258 "aaab".
    Encoding: [aaab, d, aaab, a, c] = [258, 67, 258, 64, 66].
    """
    tok = BPETokenizer().train("aaabdaaabac", 259, special_tokens=(), progress=False)
    assert tok.merges == [(64, 64), (64, 65), (256, 257)]
    assert [tok.token_bytes(i) for i in (256, 257, 258)] == [b"aa", b"ab", b"aaab"]
    assert tok.encode("aaabdaaabac") == [258, 67, 258, 64, 66]
    assert tok.vocab_size == 259 and tok.eot_id is None


def test_base_vocab_is_gpt2_byte_order():
    tok = BPETokenizer()
    assert tok.vocab_size == 256
    assert tok.encode("!") == [0] and tok.encode(" ") == [220] and tok.encode("\n") == [198]  # as GPT-2
    assert tok.encode_bytes(bytes(range(256))) != []


# ---- the fast trainer gives the slow trainer's merges ---------------------------------------

@pytest.mark.parametrize("corpus,n_tokens", [
    ("aaabdaaabac", 262),
    ("a" * 50 + " " + "ab" * 30 + " aaa aaa aaa", 300),           # runs: overlapping pairs
    ("the cat sat on the mat; the cat's hat. " * 20, 320),          # ties everywhere
    (STDLIB_TEXT[:20000], 400),
    (STDLIB_TEXT[:20000], 700),
    (["one document", "another document", "one more", "日本語のテキスト 😀😀"], 290),
])
def test_trainer_matches_reference(corpus, n_tokens):
    tok = BPETokenizer().train(corpus, n_tokens, special_tokens=(), progress=False)
    assert tok.merges == reference_train(corpus, n_tokens)


@given(st.lists(st.text(alphabet="ab c\n'", max_size=30), min_size=1, max_size=6), st.integers(257, 300))
def test_trainer_matches_reference_hypothesis(texts, n_tokens):
    tok = BPETokenizer().train(texts, n_tokens, special_tokens=(), progress=False)
    assert tok.merges == reference_train(texts, n_tokens)


def test_trainer_stops_when_pairs_run_out():
    # progress=True with > 2048 merges asked for: the tqdm bars run (and close) too
    tok = BPETokenizer().train(["ab ab"], 2400, special_tokens=("<|endoftext|>",), progress=True)
    # words: "ab", " ab" -> merges (a,b) then (" ", ab); then no pair is left
    assert len(tok.merges) == 2 and tok.vocab_size == 256 + 2 + 1 and tok.eot_id == 258


def test_train_rejects_bad_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer().train("abc", 256, special_tokens=("<|endoftext|>",))


def test_tables_grow_correctly():
    """Start every growable table tiny (word table: 4 words, 32 bytes; merge tables: 2 entries),
    so each one grows many times: results must equal the default sizes' (and so the reference)."""
    from tinylm.tokenizer._pretok import WordTable
    from tinylm.tokenizer.train import train_merges

    text = STDLIB_TEXT[:20000] + " " + "x" * 1000  # a word longer than the tiny pool
    big, small = WordCounter(), WordCounter()
    small.wt = WordTable(cap=4)
    big.add_text(text)
    small.add_text(text)
    assert _counts(small) == _counts(big) == dict(Counter(w.encode() for w in regex.findall(GPT2_PATTERN, text)))
    assert train_merges(small, 700, progress=False, cap=2) == train_merges(big, 700, progress=False)


# ---- round trips ------------------------------------------------------------------------------

@given(st.text())
def test_roundtrip_any_text(shakespeare_like, s):
    ids = shakespeare_like.encode(s)
    assert shakespeare_like.decode(ids) == s
    assert all(0 <= i < shakespeare_like.vocab_size for i in ids)


@given(tricky_text)
def test_roundtrip_tricky_text(shakespeare_like, s):
    assert shakespeare_like.decode(shakespeare_like.encode(s)) == s


@given(st.binary())
def test_roundtrip_any_bytes(shakespeare_like, b):
    assert shakespeare_like.decode_bytes(shakespeare_like.encode_bytes(b)) == b


@pytest.mark.parametrize("s", ["", "a", "😀", " \n\t", "x" * 5000, "selfreturn" * 50_000, STDLIB_TEXT])
def test_roundtrip_examples(shakespeare_like, s):
    ids = shakespeare_like.encode(s)
    assert shakespeare_like.decode(ids) == s
    if s == STDLIB_TEXT:
        assert len(ids) < len(s.encode()) / 2  # trained on it: it compresses


def test_decode_invalid_utf8_replaces(shakespeare_like):
    ids = shakespeare_like.encode_bytes(b"ok \xff\xfe end")
    assert shakespeare_like.decode(ids) == "ok \ufffd\ufffd end"
    with pytest.raises(ValueError, match="out of range"):
        shakespeare_like.decode([shakespeare_like.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        shakespeare_like.decode([-1])


def test_lone_surrogate_becomes_replacement(shakespeare_like):
    assert shakespeare_like.decode(shakespeare_like.encode("a\ud800b")) == "a\ufffdb"


def test_encode_batch_equals_encode(shakespeare_like):
    texts = ["", "hello world", STDLIB_TEXT[:3000], "日本 😀", "  x  "]
    assert shakespeare_like.encode_batch(texts) == [shakespeare_like.encode(t) for t in texts]


def test_tiny_encode_cache_clears_and_stays_correct(shakespeare_like):
    """A 4-entry, 16-byte cache fills and clears many times: the ids must not change."""
    from tinylm.tokenizer import _encode

    tok = BPETokenizer.from_dict(shakespeare_like.to_dict())
    enc, table, keys, vals, _ = tok._state()
    cache = _encode.new_cache(entries=4, byte_cap=16)
    tok._kernel_state = (enc, table, keys, vals, cache)
    assert tok.encode(STDLIB_TEXT) == shakespeare_like.encode(STDLIB_TEXT)
    assert 0 < cache[8][0] <= 4  # entries in use: it was filled (and cleared) along the way


def test_encode_uses_merges_by_rank(shakespeare_like):
    """Encoding a pre-token equals applying the merges in rank order, all occurrences each time
    (GPT-2's bpe())."""
    tok = shakespeare_like
    rank = {m: r for r, m in enumerate(tok.merges)}
    # long pre-tokens (> 128 bytes) take the kernel's heap path: check them too
    words = sorted(set(regex.findall(GPT2_PATTERN, STDLIB_TEXT[:3000]))) + ["aaaaaaa", "        ", " " * 400,
                                                                          "selfreturn" * 30, "a" * 129 + "b" * 200]
    for word in words:
        seq = list(word.encode())
        seq = [int(tok._byte_to_id[b]) for b in seq]
        while True:
            ranked = [(rank[p], i) for i, p in enumerate(zip(seq, seq[1:])) if p in rank]
            if not ranked:
                break
            a, b = tok.merges[min(ranked)[0]]
            res = tok._index[tok.token_bytes(a) + tok.token_bytes(b)]
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == (a, b):
                    out.append(res)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seq = out
        assert tok.encode(word) == seq, word


# ---- the Numba pre-tokenizer equals `regex` -------------------------------------------------

def numba_split(b: bytes) -> list[bytes]:
    from tinylm.tokenizer import _pretok
    ends = _pretok.gpt2_spans(np.frombuffer(b, np.uint8), _pretok.class_table())
    starts = [0] + ends[:-1].tolist()
    return [b[s:e] for s, e in zip(starts, ends.tolist())]


@given(st.one_of(tricky_text, st.text()))
def test_pretokenizer_equals_regex(s):
    assert numba_split(s.encode()) == [w.encode() for w in regex.findall(GPT2_PATTERN, s)]


@given(st.binary())
def test_pretokenizer_on_invalid_utf8_equals_regex_with_surrogateescape(b):
    s = b.decode("utf-8", "surrogateescape")
    expect = [w.encode("utf-8", "surrogateescape") for w in regex.findall(GPT2_PATTERN, s)]
    assert numba_split(b) == expect


def test_pretokenizer_on_stdlib_source():
    assert numba_split(STDLIB_TEXT.encode()) == [w.encode() for w in regex.findall(GPT2_PATTERN, STDLIB_TEXT)]


# ---- streaming: pieces count like the whole ----------------------------------------------------

def _counts(wc):
    pool, ws, wl, wn = wc.words()
    return {pool[s:s + n].tobytes(): int(c) for s, n, c in zip(ws, wl, wn)}


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, r"\w+|[^\w\s]+|\s+"])
@given(text=st.one_of(tricky_text, st.text(alphabet="ab '\n 1.", max_size=200)), cuts=st.lists(st.integers(0, 200), max_size=8))
def test_stream_in_pieces_counts_like_whole_text(pattern, text, cuts):
    cuts = sorted(set(c for c in cuts if c < len(text)))
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    whole = WordCounter(pattern)
    whole.add_text(text)
    streamed = WordCounter(pattern)
    streamed.add_stream(pieces)
    expect = Counter(w.encode() for w in regex.findall(pattern, text)) if pattern == GPT2_PATTERN else _counts(whole)
    assert _counts(whole) == _counts(streamed) == dict(expect)


# ---- special tokens -------------------------------------------------------------------------------

def test_special_tokens_never_split_and_only_when_allowed():
    tok = BPETokenizer().train(["hello world<|endoftext|>hello"] * 3, 300, special_tokens=("<|endoftext|>", "<|pad|>"), progress=False)
    eot, pad = tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|pad|>"]
    assert tok.eot_id == eot and tok.vocab_size == max(eot, pad) + 1
    # no learned token contains the special's text: it was cut out of the training text
    assert not any(b"endoftext" in tok.token_bytes(i) for i in range(tok.vocab_size) if i not in (eot, pad))
    s = "a<|endoftext|>b<|pad|><|endoftext|>"
    ids = tok.encode(s)
    assert ids.count(eot) == 2 and ids.count(pad) == 1 and tok.decode(ids) == s
    none = tok.encode(s, allowed_special="none")
    assert eot not in none and pad not in none and tok.decode(none) == s
    only = tok.encode(s, allowed_special={"<|pad|>"})
    assert eot not in only and only.count(pad) == 1 and tok.decode(only) == s
    assert tok.encode_batch([s, "x"]) == [ids, tok.encode("x")]
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode(s, allowed_special={"<|nope|>"})


def test_custom_pattern_roundtrip_and_reference():
    pattern = r"\w+|[^\w\s]+|\s+"
    tok = BPETokenizer(pattern=pattern).train(STDLIB_TEXT[:10000], 320, special_tokens=(), progress=False)
    assert tok.merges == reference_train(STDLIB_TEXT[:10000], 320, pattern)
    for s in ["def f(x):\n    return x", "日本 😀 ok", ""]:
        assert tok.decode(tok.encode(s)) == s
    assert tok.decode_bytes(tok.encode_bytes(b"a\xff b")) == b"a\xff b"


@pytest.mark.parametrize("module", ["gpt2", "train", "bpe", "_pretok"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"tinylm.tokenizer.{module}"))
    assert result.failed == 0 and result.attempted > 0


def test_bad_pattern_rejected():
    with pytest.raises(ValueError, match="does not compile"):
        BPETokenizer(pattern="(unclosed")
