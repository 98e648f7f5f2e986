"""GPT-2's byte-level conventions: the split pattern, the byte-to-unicode table, and its files.

GPT-2 (Radford et al. 2019, openai/gpt-2 ``src/encoder.py``) stores byte-level BPE tokens as
printable unicode strings: each of the 256 byte values is mapped to one visible character
(printable Latin-1 bytes map to themselves; the 68 others, such as space or control bytes, map
to U+0100 onwards: space -> "Ġ", newline -> "Ċ"). ``vocab.json`` maps those strings to ids;
``merges.txt`` lists one merge per line, "left right", in rank order, after an optional
``#version`` header line.

Here: the pattern, the table both ways, and readers/writers for the two files that check what
they read and name the file and line (or key) of anything malformed. Left out: the tokenizer
itself (``bpe.py``) and HF's ``tokenizer.json`` (a different, larger format).
"""
from __future__ import annotations

import json
import os

from tinylm._files import read_json

# GPT-2's pre-tokenizer split pattern (openai/gpt-2 src/encoder.py), for the `regex` package.
# It is case-sensitive ("'S" is not a contraction) exactly as GPT-2 shipped it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 table byte value -> visible character.

    >>> t = bytes_to_unicode(); t[ord("a")], t[32], t[10], t[0]
    ('a', 'Ġ', 'Ċ', 'Ā')
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)  # the 68 unprintable bytes, in byte order, from U+0100 on
            n += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# GPT-2's vocab.json gives the 256 single bytes ids 0..255 in the order of their characters
# ("!" = 0, ..., "Ā" (byte 0) = 188); tinylm's trained tokenizers use the same first 256 ids,
# and HF's trainer breaks count ties by that same order.
GPT2_BYTE_ORDER = sorted(range(256), key=lambda b: BYTE_TO_CHAR[b])


def token_to_str(b: bytes) -> str:
    """Bytes of a token -> its GPT-2 string. ``token_to_str(b" the") == "Ġthe"``."""
    return "".join(BYTE_TO_CHAR[x] for x in b)


def str_to_token(s: str) -> bytes | None:
    """GPT-2 string -> bytes, or None when ``s`` has a character outside the table.

    >>> str_to_token("Ġthe"), str_to_token("<|endoftext|>"), str_to_token("€")
    (b' the', b'<|endoftext|>', None)
    """
    try:
        return bytes(CHAR_TO_BYTE[c] for c in s)
    except KeyError:
        return None


def read_vocab_json(path: str | os.PathLike) -> dict[str, int]:
    """Read GPT-2's ``vocab.json`` (token string -> id), checking ids are distinct ints >= 0."""
    vocab = read_json(path)
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"{path}: expected a non-empty JSON object mapping token strings to ids")
    seen: dict[int, str] = {}
    for k, v in vocab.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{path}: key {k!r}: id must be an integer >= 0, got {v!r}")
        if v in seen:
            raise ValueError(f"{path}: keys {seen[v]!r} and {k!r} both have id {v}")
        seen[v] = k
    return vocab


def read_merges_txt(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read GPT-2's ``merges.txt``: an optional ``#version`` line, then "left right" per line.

    Blank lines are skipped (HF writes a trailing newline); anything else that is not two
    non-empty strings separated by one space is an error naming the line.
    """
    merges = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if lineno == 1 and line.startswith("#version"):
                continue
            if not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise ValueError(f"{path}: line {lineno}: expected 'left right' (two tokens, one space), got {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


def write_gpt2_files(dirpath: str | os.PathLike, vocab: dict[str, int], merges: list[tuple[str, str]]) -> tuple[str, str]:
    """Write ``vocab.json`` and ``merges.txt`` into ``dirpath`` (created if missing)."""
    os.makedirs(dirpath, exist_ok=True)
    vpath = os.path.join(dirpath, "vocab.json")
    mpath = os.path.join(dirpath, "merges.txt")
    with open(vpath, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(mpath, "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    return vpath, mpath
