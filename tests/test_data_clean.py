"""Cleaning steps and filters: worked examples, and properties over Hypothesis-drawn text."""
from __future__ import annotations

import random
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from test_data_support import random_doc, vocabulary
from tinylm.data.clean import (CleanConfig, clean_document, dup_line_fraction, filter_reason, normalize_nfc,
                               normalize_whitespace, redact, remove_control, strip_html)

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=200)
WORDS = vocabulary()


# ---- strip_html ------------------------------------------------------------------------
def test_strip_html_page():
    page = ("<!DOCTYPE html><html><head><title>T</title><style>p {color: red}</style>"
            "<script type='text/javascript'>var x = '<p>no</p>';</script></head>"
            "<body><!-- nav --><div class=main><p>Fish &amp; chips&nbsp;cost &lt;5&gt;.</p>"
            "<p>Second <b>bold</b> <a href='/x'>link</a>.</p></div></body></html>")
    out = strip_html(page)
    assert "color" not in out and "var x" not in out and "nav" not in out and "<" not in out.replace("<5", "")
    assert "Fish & chips\xa0cost <5>." in out
    assert "Second bold link." in out
    assert out.index("Fish") < out.index("Second")
    assert "\n" in out[out.index("Fish"):out.index("Second")]   # block tags become line breaks


@pytest.mark.parametrize("text", ["if a < b and c > d: pass", "std::vector<int> v; std::map<K, V> m;",
                                  "x &amp; y in plain text stays", "<3 you"])
def test_strip_html_leaves_non_html_alone(text):
    assert strip_html(text) == text


# ---- NFC, control characters ----------------------------------------------------------------
def test_nfc_example():
    assert normalize_nfc("cafe\u0301") == "caf\u00e9"


@given(TEXT)
def test_nfc_property(text):
    out = normalize_nfc(text)
    assert unicodedata.is_normalized("NFC", out) and normalize_nfc(out) == out
    assert unicodedata.normalize("NFD", out) == unicodedata.normalize("NFD", text)


def test_remove_control_example():
    assert remove_control("a\r\nb\rc\x00d\x1b[0m\ufeff\u200be\tf\n") == "a\nb\ncd[0me\tf\n"


@given(TEXT)
def test_remove_control_property(text):
    out = remove_control(text)
    assert all(c in "\t\n" or unicodedata.category(c) != "Cc" for c in out)
    assert "\r" not in out
    kept = [c for c in text if c not in "\r" and (c in "\t\n" or unicodedata.category(c) != "Cc")
            and c not in "\u200b\u200c\u200d\u2060\ufeff"]
    assert out.replace("\n", "") == "".join(kept).replace("\n", "")


# ---- whitespace ---------------------------------------------------------------------------
def test_whitespace_examples():
    assert normalize_whitespace("  def f():\n\n\n\n    x  =\t1   \n") == "  def f():\n\n    x = 1"
    assert normalize_whitespace("\n\na\u00a0\u2003b  c \n\n\n\nd\n\n") == "a b c\n\nd"
    assert normalize_whitespace("") == ""


@given(TEXT)
def test_whitespace_property(text):
    out = normalize_whitespace(text)
    assert normalize_whitespace(out) == out                     # idempotent
    assert out.split() == text.split()                          # words untouched
    assert "\n\n\n" not in out
    assert all(not ln.endswith((" ", "\t")) for ln in out.split("\n"))


# ---- redaction ----------------------------------------------------------------------------
def test_redact_examples():
    stats: dict = {}
    text = ("Write to jane.doe+news@mail.example.co.uk or admin@host.org. Server 192.168.10.254, "
            "v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334. Call +44 20 7946 0958, (555) 123-4567 or 555.123.4567.")
    out = redact(text, stats)
    assert out == ("Write to [EMAIL] or [EMAIL]. Server [IP], v6 [IP]. Call [PHONE], [PHONE] or [PHONE].")
    assert stats == {"redacted.email": 2, "redacted.ip": 2, "redacted.phone": 3}


@pytest.mark.parametrize("text", ["In 1999 2000 people came.", "pi is 3.14159 and e 2.71828", "version 1.2.3 of it",
                                  "on 2024-01-15 at 10:30", "chapter 12 verse 7", "999.999.999.999 is no IP",
                                  "a@b is not an address", "ISBN 978 0 13 110362 7"])
def test_redact_keeps_ordinary_numbers(text):
    stats: dict = {}
    assert redact(text, stats) == text and stats == {}


# ---- filters ------------------------------------------------------------------------------
CODE = '''def mean(xs: list[float]) -> float:
    """Arithmetic mean; raises on an empty list."""
    if not xs:
        raise ValueError("empty")
    return sum(xs) / len(xs)


class Box:
    def __init__(self, w, h):
        self.w, self.h = w, h
'''


def test_filters_keep_prose_and_code():
    rng = random.Random(0)
    cfg = CleanConfig()
    for _ in range(20):
        assert filter_reason(random_doc(rng, WORDS, rng.randint(20, 400)), cfg) is None
    assert filter_reason(CODE, cfg) is None


@pytest.mark.parametrize("text,reason", [
    ("", "empty"), (" \n\t ", "empty"), ("too short", "too_short"),
    ("{{{[[[<<<>>>]]]}}} ||| &&& $$$ ### @@@ !!! ??? %%% ^^^ ~~~", "symbols"),
    ("\ufffd" * 40 + " ok", "symbols"),
    ("Home | About | Contact\n" * 3 + "Welcome to the page of things here\n" + "Home | About | Contact\n" * 3,
     "repeated_lines"),
    ("buy cheap pills now " * 30 + "and some other words to go with them", "repeated_ngrams"),
])
def test_filters_drop(text, reason):
    assert filter_reason(text, CleanConfig()) == reason


def test_dup_line_fraction_example():
    assert dup_line_fraction("ab\nab\ncd") == pytest.approx(2 / 6)
    assert dup_line_fraction("") == 0.0


def test_clean_document_counts_each_step():
    stats: dict = {}
    cfg = CleanConfig(redact=True)
    text, words = clean_document("<p>Cafe\u0301 menu,\x00 mail  bob@example.com today please</p>\r\n", cfg, stats)
    assert text == "Caf\u00e9 menu, mail [EMAIL] today please"
    assert words[0].shape[0] == 6
    assert stats == {"cleaned.html": 1, "cleaned.nfc": 1, "cleaned.control": 1, "cleaned.whitespace": 1,
                     "redacted.email": 1}
    assert clean_document("short", cfg, stats) == (None, None)
    assert stats["dropped.too_short"] == 1
