"""Input side of the data pipeline: walk the user's paths and stream documents out of them.

A *document* is the unit that cleaning, filtering, deduplication and the train/val split work
on. What counts as one:

- **JSONL** (``.jsonl``/``.ndjson``, optionally ``.gz``): one JSON object per line; the document
  is the string under ``text_field`` (default ``"text"``). Blank lines are skipped. A text
  longer than 4 × ``chunk_bytes`` characters is cut like a long plain text (below), so one
  huge record cannot blow up the per-document work (word hashes take 8 bytes per byte).
- **Plain text** (anything else, optionally gzip: a ``.gz`` suffix or the gzip magic bytes
  ``1f 8b``, so a ``data.txt`` that is really gzip is read decompressed): documents are
  separated by the literal ``<|endoftext|>`` (the GPT-2 convention, so a file written by ``tinylm`` or by nanoGPT's
  scripts round-trips). A text without separators is *one* document, but a long one is cut
  at blank lines into pieces of about ``chunk_bytes`` (64 KiB): a 1 GB book must not be held
  in memory, and a whole-file document would make the split by document useless (one file,
  one split). A blank line is two newlines in a row (``\n\n`` or ``\r\n\r\n``). A piece that reaches 4 × ``chunk_bytes``
  without a blank line is cut at a line end; a single line longer than that is cut at a UTF-8
  character boundary.

Streaming: text files are read in 1 MiB blocks and JSONL line by line, so memory is bounded
by ~1 MiB + 4 × ``chunk_bytes`` (or the longest JSONL line) whatever the file size.

Bad input never stops the run; each case is recorded in an :class:`Issues` collector with file
and line and the run goes on with the other documents:

- ``unreadable``: the file cannot be opened or fails while being read (a dangling link, a
  corrupt or truncated gzip); documents emitted before the failure are kept, the partial one
  being assembled is dropped.
- ``invalid_utf8``: a document (or JSONL line) that is not valid UTF-8 is decoded with U+FFFD
  replacements and kept, reported once at the line of its first bad byte (the symbol-share
  filter later drops documents that are mostly garbage).
- ``binary``: a text file with a NUL byte in its first 8 KiB is skipped (git's heuristic);
  with ``binary_invalid_share`` (``tinylm train`` passes 0.3; ``prepare`` leaves it off and
  lets the symbol filter drop such text) also one where more than that share of the first
  8 KiB is not UTF-8 (a NUL-free binary, or text in a legacy encoding).
- ``not_json``, ``missing_field``: a JSONL line that does not parse, is not an object, or lacks a
  string ``text_field``. A JSON string holding a lone surrogate (``"\\ud800"``) counts as
  ``invalid_utf8`` and has it replaced by ``?``.
- ``not_a_file``: a path that is a FIFO, socket or device (opening a FIFO would block).

``tinylm prepare`` (pipeline.py) and ``tinylm train --data`` (corpus.py) both read their
inputs with ``list_files`` and ``iter_documents``: one set of rules for what a document is.

Leaves out: JSON arrays (``.json``, not streamable line by line), Parquet, zstd/bz2/xz,
remote URLs. Directory walks skip hidden entries (names starting with ``.``) and follow
symlinks to files but not to directories (no cycles).
"""
from __future__ import annotations

import fnmatch
import gzip
import json
import os
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SEPARATOR = "<|endoftext|>"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
MAX_ISSUES_KEPT = 200  # keep the first N issue records in full, count the rest
READ_BLOCK = 1 << 20   # bytes per read of a text file (tests shrink it to hit block edges)
SNIFF_BYTES = 8192     # the head of a text file checked for binary content
GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class Issues:
    """Counts bad-input events by kind and keeps the first ``MAX_ISSUES_KEPT`` in full."""

    counts: dict = field(default_factory=dict)
    records: list = field(default_factory=list)

    def add(self, kind: str, file: str, line: int | None, detail: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.records) < MAX_ISSUES_KEPT:
            self.records.append({"kind": kind, "file": file, "line": line, "detail": detail[:200]})

    def as_dict(self) -> dict:
        total = sum(self.counts.values())
        return {"counts": dict(sorted(self.counts.items())), "total": total,
                "records": self.records, "records_left_out": max(0, total - len(self.records))}


@dataclass(frozen=True)
class SourceOptions:
    text_field: str = "text"
    include: tuple = ()          # globs; a file in a directory must match one (if any given)
    exclude: tuple = ()          # globs; a file in a directory matching one is skipped
    chunk_bytes: int = 1 << 16   # target size of a piece of a long plain-text document


def _matches(rel: str, patterns) -> bool:
    base = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(base, p) for p in patterns)


def list_files(inputs, opts: SourceOptions) -> list[str]:
    """Expand files and directories into a sorted, deterministic list of file paths.

    Files named explicitly are always taken; include/exclude globs filter files found by
    walking a directory (matched against the path relative to that directory and against the
    base name). A path that does not exist raises ``FileNotFoundError``: a typo on the command
    line should stop the run before it starts, unlike a bad file deep inside a corpus.
    """
    out: list[str] = []
    for inp in inputs:
        p = Path(inp)
        if not p.exists() and not p.is_symlink():
            raise FileNotFoundError(f"input not found: {inp}")
        if not p.is_dir():
            out.append(str(p))
            continue
        for root, dirs, files in os.walk(p):  # os.walk does not follow dir symlinks by default
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                full = os.path.join(root, name)
                rel = os.path.relpath(full, p).replace(os.sep, "/")
                if opts.include and not _matches(rel, opts.include):
                    continue
                if opts.exclude and _matches(rel, opts.exclude):
                    continue
                out.append(full)
    return out


def is_gzip(path: str) -> bool:
    """A ``.gz`` suffix or the gzip magic bytes (raises OSError if the file cannot be read)."""
    if path.endswith(".gz"):
        return True
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _open(path: str):
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def invalid_utf8_share(head: bytes) -> float:
    """Share of the bytes of ``head`` that are not part of valid UTF-8 (a character cut by the
    end of ``head`` does not count)."""
    if not head:
        return 0.0
    head = head[:_safe_cut(head, len(head), b"")]
    good = len(head.decode("utf-8", errors="ignore").encode("utf-8"))
    return (len(head) - good) / max(len(head), 1)


def _is_jsonl(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.lower().endswith(JSONL_SUFFIXES)


def _decode(raw: bytes, path: str, lineno: int, issues: Issues) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        issues.add("invalid_utf8", path, lineno, f"byte {e.start}: {e.reason}")
        return raw.decode("utf-8", errors="replace")


def _safe_cut(buf: bytes, at: int, sep: bytes) -> int:
    """A cut <= at that splits neither a UTF-8 sequence nor a separator still being read.

    UTF-8: find the lead byte of the last character before ``at`` (continuation bytes are
    0b10xxxxxx) and cut before it if its sequence runs past ``at``. Separator: a tail that is
    a proper prefix of ``sep`` may be the start of one whose rest is in the next block.
    """
    at = min(at, len(buf))
    i = at - 1
    while i > at - 4 and i > 0 and buf[i] & 0xC0 == 0x80:
        i -= 1
    b = buf[i]
    need = 1 if b < 0x80 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4
    cut = at if i + need <= at else i
    for n in range(min(len(sep) - 1, cut - 1), 0, -1):
        if buf[cut - n:cut] == sep[:n]:
            cut -= n
            break
    return cut if cut > 0 else at  # a cut must make progress


def _text_docs(path: str, f, opts: SourceOptions, issues: Issues, pos: list,
               binary_invalid_share: float | None = None) -> Iterator[tuple[str, str, int]]:
    # Reads 1 MiB blocks and cuts with bytes.find: reading line by line (readline and a
    # Python loop per line) spent 0.33 s on the 5.3 MB benchmark corpus (tinyshakespeare + KJV,
    # docs/performance.md, "Benchmark corpora"), this takes ~0.02 s.
    chunk, hard = opts.chunk_bytes, 4 * opts.chunk_bytes
    sep = SEPARATOR.encode("utf-8")
    buf = b""
    line = 1
    first = True
    eof = False
    while not eof:
        block = f.read(READ_BLOCK)
        if first:
            first = False
            if b"\x00" in block[:SNIFF_BYTES]:
                issues.add("binary", path, 1, "NUL byte in the first 8 KiB; file skipped")
                return
            if binary_invalid_share is not None:
                share = invalid_utf8_share(block[:SNIFF_BYTES])
                if share > binary_invalid_share:
                    issues.add("binary", path, 1, f"{share:.0%} of the first 8 KiB is not UTF-8; file skipped")
                    return
        eof = not block
        buf += block
        while buf:
            i = buf.find(sep)
            end = len(buf) if i < 0 else i       # where the current document would end
            skip = 0
            if end >= chunk:                     # long: cut at a blank line past `chunk`
                lim = min(end, hard)
                j = buf.find(b"\n\n", chunk - 1, lim)
                jr = buf.find(b"\r\n\r\n", chunk - 1, lim)
                if jr >= 0 and (j < 0 or jr < j):
                    cut = jr + 4
                elif j >= 0:
                    cut = j + 2
                elif end >= hard:                # no blank line: cut at a line end, or anywhere
                    k = buf.rfind(b"\n", 0, hard)
                    cut = k + 1 if k > 0 else _safe_cut(buf, hard, sep)
                elif i >= 0:
                    cut, skip = i, len(sep)
                elif eof:
                    cut = len(buf)
                else:
                    break                        # read more before deciding
            elif i >= 0:
                cut, skip = i, len(sep)
            elif eof:
                cut = len(buf)
            else:
                break
            raw = buf[:cut]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                issues.add("invalid_utf8", path, line + raw.count(b"\n", 0, e.start), f"byte {e.start}: {e.reason}")
                text = raw.decode("utf-8", errors="replace")
            yield text, path, line
            line += buf.count(b"\n", 0, cut + skip)
            pos[0] = line
            buf = buf[cut + skip:]


def _split_long(text: str, chunk: int):
    """Cut a str longer than 4 * chunk: at a blank line past ``chunk``, else at a line end
    before 4 * chunk, else at 4 * chunk."""
    hard = 4 * chunk
    while len(text) > hard:
        j = text.find("\n\n", chunk - 1, hard)
        if j >= 0:
            cut = j + 2
        else:
            k = text.rfind("\n", 0, hard)
            cut = k + 1 if k > 0 else hard
        yield text[:cut]
        text = text[cut:]
    yield text


def _jsonl_docs(path: str, f, opts: SourceOptions, issues: Issues, pos: list,
                binary_invalid_share: float | None = None) -> Iterator[tuple[str, str, int]]:
    for lineno, raw in enumerate(f, 1):
        pos[0] = lineno + 1
        if not raw.strip():
            continue
        line = _decode(raw, path, lineno, issues)
        try:
            obj = json.loads(line)
        except ValueError as e:
            issues.add("not_json", path, lineno, str(e))
            continue
        text = obj.get(opts.text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            issues.add("missing_field", path, lineno, f"no string field {opts.text_field!r}")
            continue
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                # JSON may escape a lone surrogate ("\ud800"), which no UTF-8 text can hold
                issues.add("invalid_utf8", path, lineno, f"lone surrogate at character {e.start}")
                text = text.encode("utf-8", errors="replace").decode("utf-8")
        if len(text) > 4 * opts.chunk_bytes:
            for piece in _split_long(text, opts.chunk_bytes):
                yield piece, path, lineno
        else:
            yield text, path, lineno


def iter_documents(files, opts: SourceOptions, issues: Issues,
                   binary_invalid_share: float | None = None) -> Iterator[tuple[str, str, int]]:
    """Stream ``(text, file, line)`` for every document in ``files``; never raises on bad input.

    Bad input is recorded in ``issues`` as it is met (a caller that wants to stop at the first
    one checks ``issues.counts`` after each document). ``binary_invalid_share``: see the
    module docstring (None: only NUL bytes mark a binary file)."""
    for path in files:
        try:
            st = os.stat(path)
        except OSError as e:
            issues.add("unreadable", path, None, f"{type(e).__name__}: {e.strerror or e}")
            continue
        if not stat.S_ISREG(st.st_mode):
            issues.add("not_a_file", path, None, "not a regular file")
            continue
        reader = _jsonl_docs if _is_jsonl(path) else _text_docs
        pos = [1]  # the line a read failure happened on, kept up to date by the reader
        try:
            with _open(path) as f:
                yield from reader(path, f, opts, issues, pos, binary_invalid_share)
        except (OSError, EOFError, zlib.error) as e:
            # the partial document being assembled is lost; those already yielded are kept
            issues.add("unreadable", path, pos[0], f"{type(e).__name__}: {e}")
