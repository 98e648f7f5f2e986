"""Deduplication: byte scans against Python references, MinHash against exact Jaccard, the
hash table against a dict, and near-duplicate precision/recall on planted near-copies."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from test_data_support import random_doc, vocabulary
from tinylm.data.dedup import ExactDedup, NearDedup, U64Table, exact_key, lsh_params
from tinylm.data.textscan import minhash, symbol_counts, text_words, top_ngram_fraction, make_seeds

WORDS = vocabulary()
_WORD_RE = re.compile(r"[a-z0-9_\u0080-\U0010ffff]+")


def ref_words(text: str) -> list[str]:
    # the word rule of textscan for text without non-ASCII punctuation: runs of ASCII letters,
    # digits, '_' and non-ASCII code points, ASCII case-folded
    return _WORD_RE.findall("".join(c.lower() if c.isascii() else c for c in text))


def shingles(text: str, n: int = 5) -> set:
    w = ref_words(text)
    if len(w) < n:
        return {tuple(w)}
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


# ---- byte scans --------------------------------------------------------------------------
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80))
def test_word_hashes_count_words_like_reference(text):
    hashes, lengths = text_words(text)
    if all(not (0x80 <= ord(c) <= 0xBF or 0x2000 <= ord(c) <= 0x207F or 0x3000 <= ord(c) <= 0x303F
                or c == "\ufffd") for c in text):
        ref = ref_words(text)
        assert lengths.tolist() == [len(w) for w in ref]
        # equal words hash equally, different words differently (64-bit: no collision expected)
        for i in range(len(ref)):
            for j in range(len(ref)):
                assert (hashes[i] == hashes[j]) == (ref[i] == ref[j])


def test_word_hashes_case_fold_and_punctuation():
    h1, l1 = text_words("Hello, WORLD! naïve—café")
    h2, _ = text_words("hello world naïve café")
    assert l1.tolist() == [5, 5, 5, 4]   # the em dash (U+2014) separates words
    assert np.array_equal(h1, h2)


@pytest.mark.parametrize("text,nonspace,symbols", [
    ("", 0, 0), ("a+b = c", 5, 2), ("héllo wörld", 10, 0), ("«quoted» — yes…", 13, 4),
    ("\ufffd\ufffd ok", 4, 2), ("x\ty\nz", 3, 0)])
def test_symbol_counts(text, nonspace, symbols):
    assert symbol_counts(np.frombuffer(text.encode(), np.uint8)) == (nonspace, symbols)


def test_top_ngram_fraction_known_answers():
    # 28 3-grams; "ab cd ef" occurs 10 times, 6 characters each, of 60 word characters
    h, l = text_words("ab cd ef " * 10)
    assert top_ngram_fraction(h, l, 3) == pytest.approx(10 * 6 / 60)
    # 4 3-grams, all distinct: one occurrence of 3 characters (p q r) of 6
    h, l = text_words("p q r s t u")
    assert top_ngram_fraction(h, l, 3) == pytest.approx(3 / 6)
    # overlapping occurrences each count: 3 x 3 of 5
    h, l = text_words("a a a a a")
    assert top_ngram_fraction(h, l, 3) == pytest.approx(9 / 5)
    h, l = text_words("aa bb")
    assert top_ngram_fraction(h, l, 3) == 0.0


def test_minhash_estimates_jaccard():
    rng = random.Random(3)
    seeds = make_seeds(256, 0)
    errors = []
    for _ in range(40):
        a = random_doc(rng, WORDS, 150).split()
        b = list(a)
        for i in rng.sample(range(len(b)), rng.randint(0, 40)):
            b[i] = rng.choice(WORDS)
        ta, tb = " ".join(a), " ".join(b)
        j = jaccard(shingles(ta), shingles(tb))
        sa = minhash(text_words(ta)[0], 5, seeds)
        sb = minhash(text_words(tb)[0], 5, seeds)
        errors.append(np.mean(sa == sb) - j)
    errors = np.array(errors)
    # unbiased with standard error <= sqrt(0.25/256) = 0.031 per pair
    assert abs(errors.mean()) < 0.02
    assert np.abs(errors).max() < 0.13


def test_lsh_params_fit_the_permutations():
    for t, k in [(0.5, 64), (0.8, 128), (0.9, 256), (0.7, 10)]:
        b, r = lsh_params(t, k)
        assert b * r <= k
        # the S-curve's steepest point (1/b)^(1/r) sits at or below the threshold: recall first
        assert (1 / b) ** (1 / r) <= t + 0.02


# ---- hash table ----------------------------------------------------------------------------
@given(st.lists(st.tuples(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 3)), st.integers(-2**62, 2**62)),
                max_size=300))
def test_u64_table_is_a_multimap(pairs):
    table = U64Table(capacity=4)
    ref: dict = {}
    for k, v in pairs:
        table.put(k, v)
        ref.setdefault(max(k, 1) if k in (0, 1) else k, []).append(v)
    for k, vals in ref.items():
        assert sorted(table.find(k).tolist()) == sorted(vals)
    assert table.find(123456789).shape[0] == len(ref.get(123456789, []))
    assert table.size == len(pairs) and 2 * table.size <= table.keys.shape[0]


def test_u64_table_returns_every_value_of_a_crowded_key():
    table = U64Table(capacity=4)
    for v in range(200):
        table.put(42, v)
        table.put(43 + v, -v)
    assert sorted(table.find(42).tolist()) == list(range(200))
    assert table.find(43 + 150).tolist() == [-150]


# ---- exact -------------------------------------------------------------------------------
def test_exact_key_ignores_whitespace_only():
    assert exact_key("a  b\n\tc \n") == exact_key("a b c")
    assert exact_key("a b c") != exact_key("a b  d")
    assert exact_key("ab c") != exact_key("a bc")
    ed = ExactDedup()
    assert ed.find(exact_key("x y")) is None
    ed.add(exact_key("x y"), 0)
    assert ed.find(exact_key(" x\ny ")) == 0
    assert ed.find(exact_key("x z")) is None


# ---- near: precision / recall against exact Jaccard ----------------------------------------
def planted_corpus(seed: int, n_base: int = 150, n_var: int = 150):
    """Distinct base documents, then edited copies with a spread of similarities."""
    rng = random.Random(seed)
    bases = [random_doc(rng, WORDS, rng.randint(80, 250)) for _ in range(n_base)]
    variants = []
    for _ in range(n_var):
        w = rng.choice(bases).split()
        rate = rng.uniform(0.0, 0.10)     # substitutions, insertions, deletions at this rate
        for i in sorted(rng.sample(range(len(w)), int(rate * len(w))), reverse=True):
            op = rng.random()
            if op < 0.6:
                w[i] = rng.choice(WORDS)
            elif op < 0.8:
                w.insert(i, rng.choice(WORDS))
            else:
                del w[i]
        variants.append(" ".join(w))
    docs = bases + variants
    rng.shuffle(docs)
    return docs


@pytest.mark.parametrize("threshold,num_perm", [(0.8, 128), (0.6, 128), (0.8, 256)])
def test_near_dedup_precision_recall(threshold, num_perm):
    docs = planted_corpus(seed=int(threshold * 100) + num_perm)
    sets = [shingles(d) for d in docs]
    # ground truth with the same first-kept-wins rule, on exact Jaccard
    kept: list[int] = []
    truth = set()
    for i, s in enumerate(sets):
        if any(jaccard(s, sets[j]) >= threshold for j in kept):
            truth.add(i)
        else:
            kept.append(i)
    near = NearDedup(threshold=threshold, num_perm=num_perm, ngram=5, seed=0)
    found = {i for i, d in enumerate(docs) if near.check(near.signature(d), i, d, docs.__getitem__) is not None}
    # the corpus must plant duplicates on both sides of the threshold for the test to mean much
    sims = [max((jaccard(sets[i], sets[j]) for j in range(len(docs)) if j != i), default=0) for i in range(len(docs))]
    above = sum(s >= threshold for s in sims)
    between = sum(0.3 <= s < threshold for s in sims)
    assert above >= 50 and between >= 30, (above, between)
    tp = len(found & truth)
    precision = tp / len(found)
    recall = tp / len(truth)
    print(f"t={threshold} K={num_perm}: {len(truth)} true, {len(found)} found, precision {precision:.3f}, "
          f"recall {recall:.3f}, {near.candidates} candidates")
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, len(found), len(truth))


def test_near_dedup_estimate_mode_away_from_the_threshold():
    """verify="estimate" needs no text but errs near the threshold (standard error ~0.04 at
    K = 128): it must be right on every pair at least 0.12 away from it."""
    rng = random.Random(11)
    checked = 0
    for _ in range(150):
        a = random_doc(rng, WORDS, 150).split()
        b = list(a)
        for i in rng.sample(range(len(b)), rng.randint(0, 25)):
            b[i] = rng.choice(WORDS)
        ta, tb = " ".join(a), " ".join(b)
        j = jaccard(shingles(ta), shingles(tb))
        if abs(j - 0.8) < 0.12:
            continue
        near = NearDedup(threshold=0.8, num_perm=128, verify="estimate")
        assert near.check(near.signature(ta), 0) is None
        assert (near.check(near.signature(tb), 1) == 0) == (j >= 0.8), j
        checked += 1
    assert checked >= 80
    with pytest.raises(ValueError):
        NearDedup(verify="exact").check(near.signature(ta), 0)     # exact mode needs the text
