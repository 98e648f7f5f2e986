"""Cleaning steps and document filters, each a small function with its own counter.

``clean_document(text, cfg, stats)`` runs, in order:

1. ``strip_html``: only when the text holds known HTML tags (so ``a < b`` and C++'s
   ``vector<int>`` survive): drops ``<script>``/``<style>``/``<noscript>`` blocks and comments,
   turns block tags into line breaks, drops inline tags, unescapes entities.
2. ``normalize_nfc``: Unicode NFC (composed form), so ``é`` is one code point everywhere.
3. ``remove_control``: CR/LF → LF, C0/C1 control characters other than tab and newline removed,
   zero-width and byte-order marks removed.
4. ``normalize_whitespace``: Unicode spaces → space, trailing spaces cut, runs of spaces and
   tabs *inside* a line → one space (leading indentation is kept: code needs it), three or more
   newlines → one blank line, the document stripped.
5. ``redact`` (optional): e-mail addresses → ``[EMAIL]``, IPv4 and full-form IPv6 addresses →
   ``[IP]``, phone numbers (7+ digits in groups, optional +country and (area)) → ``[PHONE]``.

then the filters, each returning the reason a document is dropped or ``None``:
``empty``, ``too_short`` (fewer than ``min_chars`` characters), ``symbols`` (share of
non-space characters that are neither letters, digits nor ``_`` above ``max_symbol_ratio``),
``repeated_lines`` (share of characters in lines already seen in the document), and
``repeated_ngrams`` (share of characters covered by the most frequent word 3-gram). The
thresholds follow the Gopher rules (Rae et al. 2021, "Scaling Language Models", appendix A),
loosened where code tripped them (measurements at ``CleanConfig``); the report of every run
says what each filter dropped.

``stats`` is a plain ``dict[str, int]`` (``cleaned.*``: documents a step changed;
``redacted.*``: replacements; ``dropped.*``: documents a filter dropped), summed across worker
processes by the pipeline.

Leaves out: language identification, quality classifiers, boilerplate (menu/footer) removal,
named-entity PII, IPv6 shorthand (``::``), and a full HTML parser (regexes suffice for the
scraped-page case; malformed markup may leave fragments behind).
"""
from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from tinylm.data.textscan import symbol_counts, text_words, top_ngram_fraction, word_hashes


@dataclass(frozen=True)
class CleanConfig:
    min_chars: int = 16                 # shorter documents carry no context worth training on
    # Gopher bounds symbol-to-word at 0.1; on the stdlib files the share of symbol characters
    # has median 0.15, 99th percentile 0.30 (0.35 drops 0.5%); KJV and Shakespeare ~0.04-0.06
    max_symbol_ratio: float = 0.35
    # Gopher's dup_line_char_frac is 0.20, for web pages; code repeats lines ("else:",
    # "return x") by nature: over the 1913 .py files of CPython 3.11's stdlib the 95th and
    # 99th percentiles are 0.31 and 0.44 (0.5 drops 0.5% of them); Shakespeare pieces <= 0.08
    max_dup_line_frac: float = 0.50
    # Gopher's top 3-gram character fraction is 0.18; stdlib files: 99th percentile 0.19
    max_top_ngram_frac: float = 0.20
    ngram_min_words: int = 50           # below this a single repeated phrase dominates by chance
    redact: bool = False


def bump(stats: dict, key: str, n: int = 1) -> None:
    stats[key] = stats.get(key, 0) + n


# ---- 1. HTML ----------------------------------------------------------------------------
_TAGS = ("html|head|body|div|p|span|a|br|hr|script|style|noscript|table|thead|tbody|tr|td|th|"
         "ul|ol|li|dl|dt|dd|h[1-6]|img|meta|link|title|section|article|nav|footer|header|main|"
         "aside|em|strong|b|i|u|code|pre|blockquote|form|input|button|iframe|label|select|option|"
         "sup|sub|small|figure|figcaption|svg|path")
_HTML_SIGN = re.compile(rf"<!--|<!doctype|</?(?:{_TAGS})\b[^<>]*>", re.IGNORECASE)
_SCRIPTS = re.compile(r"<(script|style|noscript)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENTS = re.compile(r"<!--.*?-->|<!doctype[^>]*>", re.IGNORECASE | re.DOTALL)
_BLOCK = re.compile(r"</?(?:p|div|br|hr|li|tr|h[1-6]|table|ul|ol|dl|dt|dd|section|article|blockquote|"
                    r"pre|title|header|footer|nav|main|aside|figure|form)\b[^<>]*>", re.IGNORECASE)
_INLINE = re.compile(rf"</?(?:{_TAGS})\b[^<>]*>", re.IGNORECASE)


def strip_html(text: str) -> str:
    """``"<p>a &amp; b</p><script>x()</script>"`` → ``"\\na & b\\n"``; plain text unchanged."""
    if "<" not in text or not _HTML_SIGN.search(text):
        return text
    text = _SCRIPTS.sub("", text)
    text = _COMMENTS.sub("", text)
    text = _BLOCK.sub("\n", text)
    text = _INLINE.sub("", text)
    return html.unescape(text)


# ---- 2. Unicode NFC ---------------------------------------------------------------------
def normalize_nfc(text: str) -> str:
    """``"e\\u0301"`` → ``"\\u00e9"``. ``is_normalized`` first: most text already is, and the
    check does not allocate."""
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


# ---- 3. control characters --------------------------------------------------------------
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200c\u200d\u2060\ufeff]")


def remove_control(text: str) -> str:
    """``"a\\r\\nb\\x00c\\ufeff"`` → ``"a\\nbc"``; tabs and newlines stay."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


# ---- 4. whitespace ----------------------------------------------------------------------
_USPACE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_RUN = re.compile(r"[ \t]{2,}|\t")
_BLANKS = re.compile(r"\n{3,}")


def _fix_line(line: str) -> str:
    line = line.rstrip(" \t")
    body = line.lstrip(" \t")
    if "  " in body or "\t" in body:
        line = line[: len(line) - len(body)] + _RUN.sub(" ", body)
    return line


def normalize_whitespace(text: str) -> str:
    """``"  def f():\\n\\n\\n\\n    x  =\\t1   \\n"`` -> ``"  def f():\\n\\n    x = 1"``."""
    # cheap `in` tests guard every pass, and lines are fixed one by one only when a run can
    # occur: whole-text regexes with a lookbehind took 0.14-0.21 s on the 3.2 MB KJV Old
    # Testament, which holds a single double space
    if not text.isascii():
        text = _USPACE.sub(" ", text)
    if "  " in text or "\t" in text or " \n" in text:
        text = "\n".join(_fix_line(ln) if ("  " in ln or "\t" in ln or ln.endswith(" ")) else ln
                         for ln in text.split("\n"))
    if "\n\n\n" in text:
        text = _BLANKS.sub("\n\n", text)
    # strip blank lines around the document but keep the first line's indentation
    return text.strip("\n").rstrip()


# ---- 5. redaction -----------------------------------------------------------------------
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IP = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w.]*\d)|\b(?:[0-9A-Fa-f]{{1,4}}:){{7}}[0-9A-Fa-f]{{1,4}}\b")
_PHONE = re.compile(r"(?<![\w+.-])(\+\d{1,3}[ .-]?)?(\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{3,4}){1,3}(?![\w-]|\.\d)")
_DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_DIGITS = re.compile(r"\d")


def _phone(m: re.Match) -> str:
    # 7-15 digits (E.164 allows at most 15) in groups of 3-4 after the first (so dates like
    # 2024-01-15 stay); groups split by spaces alone need a +country, an (area) or 10+ digits,
    # so "in 1999 2000" (two years) stays
    s = m.group(0)
    if _DOTTED_QUAD.fullmatch(s):
        return s  # an IP-like number (999.1.2.3), not a phone
    n = len(_DIGITS.findall(s))
    marked = m.group(1) or m.group(2) or "-" in s or "." in s or n >= 10
    return "[PHONE]" if 7 <= n <= 15 and marked else s


def redact(text: str, stats: dict) -> str:
    """``"mail a.b@c.org from 10.0.0.1, call +1 (555) 123-4567"`` →
    ``"mail [EMAIL] from [IP], call [PHONE]"``."""
    text, n = _EMAIL.subn("[EMAIL]", text)
    if n:
        bump(stats, "redacted.email", n)
    text, n = _IP.subn("[IP]", text)
    if n:
        bump(stats, "redacted.ip", n)
    before = text
    text = _PHONE.sub(_phone, text)
    if text != before:
        bump(stats, "redacted.phone", text.count("[PHONE]") - before.count("[PHONE]"))
    return text


# ---- filters ---------------------------------------------------------------------------
# the character and word scans run in Numba (textscan): the `re`-based versions of
# symbol_ratio and the Counter-based top n-gram took 0.31 s and 0.63 s on the 3.2 MB KJV Old
# Testament, against 0.02 s and 0.16 s (word hashes + n-gram count) for the byte scans.
def symbol_ratio(buf) -> float:
    """Share of non-space characters that are not word characters: ``"a+b = c"`` -> 2/5."""
    nonspace, symbols = symbol_counts(buf)
    return symbols / nonspace if nonspace else 0.0


def dup_line_fraction(text: str) -> float:
    """Share of characters (in non-blank lines) that sit in a line already seen earlier:
    ``"ab\nab\ncd"`` -> 2/6."""
    seen: set = set()
    total = dup = 0
    for line in text.split("\n"):
        s = line.strip()
        if not s:
            continue
        total += len(s)
        if s in seen:
            dup += len(s)
        else:
            seen.add(s)
    return dup / total if total else 0.0


def ngram_fraction(words, cfg: CleanConfig) -> float:
    """Share of word characters in the most frequent word 3-gram (0 below ``ngram_min_words``)."""
    hashes, lengths = words
    if hashes.shape[0] < cfg.ngram_min_words:
        return 0.0
    return top_ngram_fraction(hashes, lengths, 3)


def filter_reason(text: str, cfg: CleanConfig, words=None) -> str | None:
    """Name of the first filter that drops ``text``, or None. ``words``: ``text_words(text)``."""
    if not text.strip():
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    buf = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if symbol_ratio(buf) > cfg.max_symbol_ratio:
        return "symbols"
    if dup_line_fraction(text) > cfg.max_dup_line_frac:
        return "repeated_lines"
    if ngram_fraction(word_hashes(buf) if words is None else words, cfg) > cfg.max_top_ngram_frac:
        return "repeated_ngrams"
    return None


CLEAN_STEPS = (("html", strip_html), ("nfc", normalize_nfc), ("control", remove_control),
               ("whitespace", normalize_whitespace))


def clean_document(text: str, cfg: CleanConfig, stats: dict):
    """Run every cleaning step and filter -> ``(cleaned text, words)`` or ``(None, None)``.

    ``words`` is ``text_words(cleaned text)``, returned so near-dedup need not scan again.
    """
    for name, step in CLEAN_STEPS:
        out = step(text)
        if out != text:
            bump(stats, f"cleaned.{name}")
        text = out
    if cfg.redact:
        text = redact(text, stats)
    words = text_words(text) if text.strip() else None
    reason = filter_reason(text, cfg, words)
    if reason is not None:
        bump(stats, f"dropped.{reason}")
        return None, None
    return text, words
