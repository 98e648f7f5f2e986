"""Tokens for training: from a prepared directory, from text files, or from the built-in corpus.

The built-in corpus is the source of Python's standard library, which every Python install
already has: its ``.py`` files in sorted path order (tests and site-packages left out) until
``corpus_mb`` megabytes. Each file is a document.

**Reading** (``--data a.txt dir/ b.jsonl.gz``): the same reader as ``tinylm prepare``
(``tinylm.data.sources``: ``list_files`` then ``iter_documents``): a directory means every
file under it (hidden names skipped), gzip is decompressed (``.gz`` suffix or magic bytes),
JSONL gives the ``"text"`` field of each line, plain text is cut at ``<|endoftext|>`` and a
long text at blank lines into ~64 KiB documents. A binary file (a NUL byte, or over 30% of
its first 8 KiB not UTF-8) is skipped, and one warning line names the skipped files;
invalid UTF-8 in a text is replaced (U+FFFD) with a warning. Anything else wrong with an
input (a JSONL line that is not JSON or has no ``"text"``, a corrupt gzip, a FIFO) stops the
run with an error naming the file and line: ``tinylm prepare`` is the tool that skips bad
records and reports them.

**Streaming.** Documents are read, tokenized in batches of ~1 MB and appended to the cache's
``.npy`` files as they come, so memory does not grow with the corpus. A BPE tokenizer is
trained (unless one is given) on the first ``TOKENIZER_TRAIN_BYTES`` of the training
documents, read in a first pass; its memory is the table of their distinct pre-tokens.

**Split.** Every 20th document goes to validation (deterministic). With fewer documents than
that, or when one side would be shorter than a window of ``block_size + 1`` tokens, the split
is by tokens instead: the last ~5% of the tokens (at least one window) are the validation
set. Less than two windows of tokens in all is an error that says how many there are.

**Cache.** ``out_dir/data/<key>/`` holds ``train.npy``, ``val.npy``, ``tokenizer.json`` and
``meta.json``. The key is the inputs' identity (resolved paths, sizes, modification times),
the reader's settings and ``vocab_size``; the tokenizer trained for it is stored inside. A
run given a tokenizer (``--resume`` passes the checkpoint's) reuses that cache when the
tokenizer's content (``fingerprint()``) is the one stored, else it uses a cache keyed by the
inputs and that fingerprint. Caches are built in ``<key>.tmp-<pid>`` and renamed into place;
temporary directories left by runs that died (their process is gone) are removed, with a
line saying so, at the start of the next run. A directory written by ``tinylm prepare``
(cleaning, dedup, shards) is read as it is.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VAL_EVERY = 20          # every 20th document goes to validation
VAL_SHARE = 0.05        # the token split's validation share (few documents)
TOKENIZER_TRAIN_BYTES = 64 << 20  # the BPE tokenizer is trained on at most this much text
BATCH_BYTES = 1 << 20   # text tokenized per batch
BINARY_INVALID_SHARE = 0.3  # a file whose first 8 KiB is over 30% invalid UTF-8 is binary
STDLIB_CHUNK_BYTES = 1 << 20  # the built-in corpus: each .py file (< 250 KB) one document
CACHE_FORMAT = 2        # bump when what a cache holds or how it is made changes
ERROR_KINDS = ("not_json", "missing_field", "unreadable", "not_a_file")  # stop the run
SHOW_FILES = 5          # files named in a warning line


@dataclass
class TokenData:
    train: np.ndarray          # 1-D token ids (memmap)
    val: np.ndarray
    tokenizer: object          # BPETokenizer
    bytes_per_token: float     # of the validation text, for bits per byte


def stdlib_files(max_mb: float) -> list[Path]:
    """The built-in corpus: standard-library .py files, sorted, up to ``max_mb`` MB."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if any(part in ("test", "tests", "site-packages", "idle_test") for part in rel):
            continue
        size = p.stat().st_size
        if size == 0:
            continue
        files.append(p)
        total += size
        if total >= max_mb * 1e6:
            break
    if not files:
        raise FileNotFoundError(f"no .py files found under {root}: cannot build the built-in corpus")
    return files


def expand_paths(paths: list[str]) -> list[Path]:
    """Files of ``--data``: files as given, directories walked (sorted, hidden names skipped)."""
    from tinylm.data.sources import SourceOptions, list_files  # noqa: PLC0415

    out: list[Path] = []
    for s in paths:
        p = Path(s)
        if not p.exists() and not p.is_symlink():
            raise FileNotFoundError(f"--data {s}: no such file or directory")
        found = list_files([s], SourceOptions())
        if p.is_dir() and not found:
            hidden = any(True for _ in p.iterdir())
            raise ValueError(f"--data {s}: the directory contains no files"
                             + (" (only hidden ones, whose names start with '.', which are skipped)" if hidden else ""))
        out.extend(Path(f) for f in found)
    if not out:
        raise ValueError(f"--data {' '.join(paths)}: no files found")
    return out


# ---- reading ---------------------------------------------------------------------------------

class _Reader:
    """Non-empty documents of the inputs, in order; stops at the first error (ERROR_KINDS)."""

    def __init__(self, files: list[Path], builtin: bool):
        from tinylm.data.sources import SourceOptions  # noqa: PLC0415

        self.files = [str(p) for p in files]
        self.opts = SourceOptions(chunk_bytes=STDLIB_CHUNK_BYTES) if builtin else SourceOptions()
        self.binary_share = None if builtin else BINARY_INVALID_SHARE

    def identity(self) -> dict:
        files = []
        for f in self.files:
            st = os.stat(f)
            files.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
        return {"files": files, "chunk_bytes": self.opts.chunk_bytes, "binary_share": self.binary_share,
                "text_field": self.opts.text_field, "format": CACHE_FORMAT}

    def documents(self, issues):
        from tinylm.data.sources import iter_documents  # noqa: PLC0415

        seen = 0
        for text, path, line in iter_documents(self.files, self.opts, issues, self.binary_share):
            seen = _raise_on_error(issues, seen)
            if text.strip():
                yield text
        _raise_on_error(issues, seen)


def _raise_on_error(issues, seen: int) -> int:
    """Raise for the first new error record; -> records seen."""
    for r in issues.records[seen:]:
        if r["kind"] in ERROR_KINDS:
            where = r["file"] + (f", line {r['line']}" if r["line"] is not None else "")
            what = {"not_json": "not a JSON object on this line", "missing_field": "",
                    "unreadable": "cannot be read", "not_a_file": "not a regular file"}[r["kind"]]
            detail = r["detail"] if not what else f"{what} ({r['detail']})"
            raise ValueError(f"--data {where}: {detail}; `tinylm prepare` skips bad records and reports them")
    if len(issues.records) < sum(issues.counts.values()):  # past the kept records: count only
        bad = sum(issues.counts.get(k, 0) for k in ERROR_KINDS)
        if bad:
            raise ValueError(f"--data: {bad} unreadable or malformed inputs; run `tinylm prepare` to list them")
    return len(issues.records)


def _warnings(issues) -> list[str]:
    out = []
    for kind, what in (("binary", "binary file{s} (NUL bytes, or mostly not UTF-8)"),
                       ("invalid_utf8", "document{s} with invalid UTF-8, replaced by U+FFFD,")):
        n = issues.counts.get(kind, 0)
        if not n:
            continue
        names = list(dict.fromkeys(r["file"] + ("" if kind == "binary" else f":{r['line']}")
                                   for r in issues.records if r["kind"] == kind))
        shown = ", ".join(names[:SHOW_FILES]) + (f" and {n - SHOW_FILES} more" if n > SHOW_FILES else "")
        verb = "skipped" if kind == "binary" else "read"
        out.append(f"warning: --data: {verb} {n} {what.format(s='' if n == 1 else 's')}: {shown}")
    return out


# ---- token files -----------------------------------------------------------------------------

def _npy_header(dtype, n: int) -> bytes:
    import io  # noqa: PLC0415

    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": (int(n),)})
    return b.getvalue()


class _TokenFile:
    """A 1-D ``.npy`` written by appending: a header for the final length is written at close
    (its size does not depend on the length: numpy pads it to 64 bytes, 128 for any 1-D shape)."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self.f = open(path, "wb")
        self.head = len(_npy_header(self.dtype, 0))
        self.f.write(_npy_header(self.dtype, 0))

    def append(self, ids: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.n += len(ids)

    def close(self) -> None:
        head = _npy_header(self.dtype, self.n)
        if len(head) != self.head:  # never for 1-D shapes; guard against a numpy change
            raise RuntimeError(f"{self.path}: .npy header changed size ({self.head} -> {len(head)} bytes)")
        self.f.seek(0)
        self.f.write(head)
        self.f.close()


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def _encode_flat(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, end offset of each text), special-token text encoded as ordinary text."""
    flat = getattr(tok, "encode_batch_flat", None)
    if flat is None and hasattr(tok, "_encode_ordinary"):
        # BPETokenizer: the kernel's arrays, without encode_batch's per-document lists
        flat = lambda ts, allowed_special: tok._encode_ordinary(ts, False)  # noqa: E731
    if flat is not None:
        ids, ends = flat(texts, allowed_special="none")
        return np.asarray(ids, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    lists = tok.encode_batch(texts, allowed_special="none")
    ends = np.cumsum([len(x) for x in lists], dtype=np.int64)
    return np.fromiter((i for x in lists for i in x), dtype=np.int64, count=int(ends[-1]) if len(ends) else 0), ends


def _with_eot(ids: np.ndarray, ends: np.ndarray, eot: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids with ``eot`` after each text -> (stream, length of each text's part, eot included)."""
    n = len(ends)
    eot_at = ends + np.arange(n)
    stream = np.empty(len(ids) + n, dtype=np.int64)
    mask = np.ones(len(stream), dtype=bool)
    mask[eot_at] = False
    stream[mask] = ids
    stream[eot_at] = eot
    return stream, np.diff(np.concatenate([[0], ends])) + 1


# ---- cache -----------------------------------------------------------------------------------

def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _complete(cache: Path) -> dict | None:
    """The meta of a complete cache directory, else None."""
    try:
        meta = json.loads((cache / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT and all(
        (cache / n).is_file() for n in ("train.npy", "val.npy", "tokenizer.json"))
    return meta if ok else None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def remove_stale_temps(data_dir: Path) -> list[Path]:
    """Remove ``*.tmp-<pid>`` entries of ``data_dir`` whose process is gone; print a line each."""
    removed = []
    if not data_dir.is_dir():
        return removed
    for p in sorted(data_dir.glob("*.tmp-*")):
        pid = p.name.rsplit(".tmp-", 1)[1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        size = _size(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        if not p.exists():
            removed.append(p)
            print(f"removed {p}: a temporary data cache ({size / 1e6:.1f} MB) left by an interrupted run "
                  f"(process {pid} is no longer running)", flush=True)
    return removed


def _write_meta(tmp: Path, meta: dict) -> None:
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


def _build(cache: Path, reader: _Reader, cfg, given) -> dict:
    """Read, (train a tokenizer,) tokenize and write the cache directory -> its meta."""
    from tinylm.data.sources import Issues  # noqa: PLC0415
    from tinylm.tokenizer import BPETokenizer  # noqa: PLC0415

    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if given is not None:
            tok = given
        else:
            limit = TOKENIZER_TRAIN_BYTES
            used = {"chars": 0, "docs": 0}

            def sample():
                for i, text in enumerate(reader.documents(Issues())):
                    if i % VAL_EVERY == VAL_EVERY - 1:
                        continue
                    if used["chars"] >= limit:
                        return
                    used["chars"] += len(text)
                    used["docs"] += 1
                    yield text

            t0 = time.perf_counter()
            tok = BPETokenizer().train(sample(), cfg.vocab_size, special_tokens=("<|endoftext|>",),
                                       progress=cfg.progress)
            print(f"trained a {cfg.vocab_size}-token BPE tokenizer on {used['chars'] / 1e6:.1f} MB "
                  f"({used['docs']} documents{', the first ' + str(limit >> 20) + ' MB' if used['chars'] >= limit else ''})"
                  f" in {time.perf_counter() - t0:.1f} s", flush=True)
            if tok.vocab_size < cfg.vocab_size:
                print(f"note: the text ran out of pairs to merge: the tokenizer has {tok.vocab_size} tokens, "
                      f"not the {cfg.vocab_size} asked for", flush=True)
        if tok.eot_id is None:
            raise ValueError("the tokenizer has no <|endoftext|> special token to put between documents")
        tok.save(tmp / "tokenizer.json")
        dtype = _token_dtype(tok.vocab_size)
        issues = Issues()
        writers = {False: _TokenFile(tmp / "train.npy", dtype), True: _TokenFile(tmp / "val.npy", dtype)}
        n_docs = val_bytes = 0
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm  # noqa: PLC0415

            total = sum(os.stat(f).st_size for f in reader.files)  # characters against bytes: close enough
            bar = tqdm(total=total, desc="tokenize", unit="B", unit_scale=True, leave=False)
        batch: list[str] = []
        size = 0

        def flush():
            nonlocal val_bytes
            ids, ends = _encode_flat(tok, batch)
            if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
                raise ValueError(f"tokenizer produced an id outside [0, {tok.vocab_size})")
            stream, lengths = _with_eot(ids, ends, tok.eot_id)
            first = n_docs - len(batch)
            is_val = (np.arange(first, n_docs) % VAL_EVERY) == VAL_EVERY - 1
            tok_val = np.repeat(is_val, lengths)
            writers[False].append(stream[~tok_val])
            writers[True].append(stream[tok_val])
            val_bytes += sum(len(t.encode("utf-8")) for t, v in zip(batch, is_val) if v)
            batch.clear()

        try:
            for text in reader.documents(issues):
                batch.append(text)
                n_docs += 1
                size += len(text)
                if size >= BATCH_BYTES:
                    flush()
                    if bar is not None:
                        bar.update(size)
                    size = 0
            if batch:
                flush()
            for w in writers.values():
                w.close()
        finally:
            for w in writers.values():
                w.f.close()  # no-op after close()
            if bar is not None:
                bar.close()
        meta = {"format": CACHE_FORMAT, "files": len(reader.files), "documents": n_docs,
                "train_tokens": writers[False].n, "val_tokens": writers[True].n, "val_bytes": val_bytes,
                "tokenizer_fingerprint": tok.fingerprint(), "warnings": _warnings(issues),
                "inputs": reader.files[:3] + (["..."] if len(reader.files) > 3 else [])}
        _write_meta(tmp, meta)
        try:
            os.rename(tmp, cache)
        except OSError:
            if _complete(cache) is None:  # a broken leftover: replace it
                shutil.rmtree(cache, ignore_errors=True)
                os.rename(tmp, cache)
            else:                         # another run finished the same cache first
                shutil.rmtree(tmp, ignore_errors=True)
                meta = _complete(cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _split(train: np.ndarray, val: np.ndarray, window: int, where: str):
    """-> (train, val, tokens moved to val, tokens moved to train), each side >= ``window`` long.

    What is moved is small: the token split only happens with fewer than 20 documents (each
    at most 256 KiB), a top-up is less than a window."""
    n = len(train) + len(val)
    if n < 2 * window:
        raise ValueError(f"--data {where}: {n:,} tokens found, at least {2 * window:,} needed "
                         f"(a window of block_size + 1 = {window} tokens to train on and one to validate on)")
    none = np.zeros(0, np.int64)
    if len(val) == 0:  # too few documents for every 20th: the last ~5% of the tokens
        k = min(max(window, round(VAL_SHARE * n)), n - window)
        tail = np.asarray(train[-k:])
        return train[:-k], tail, tail, none
    if len(val) < window:  # top validation up with the end of the training tokens
        tail = np.asarray(train[-(window - len(val)):])
        return train[:-len(tail)], np.concatenate([np.asarray(val), tail]), tail, none
    if len(train) < window:  # the reverse (a huge 20th document)
        head = np.asarray(val[:window - len(train)])
        return np.concatenate([np.asarray(train), head]), val[len(head):], none, head
    return train, val, none, none


def get_tokens(cfg, out_dir: Path, tokenizer_path: Path | None = None) -> TokenData:
    from tinylm.tokenizer import BPETokenizer  # noqa: PLC0415

    if cfg.data and len(cfg.data) == 1 and Path(cfg.data[0]).is_dir():
        from tinylm import data as tdata  # noqa: PLC0415

        if tdata.is_prepared_dir(cfg.data[0]):
            prep = tdata.load_prepared(cfg.data[0])
            tok = BPETokenizer.load(tokenizer_path or prep.tokenizer_path)
            return TokenData(prep.train, prep.val, tok, _bytes_per_token(tok, prep.val))

    data_dir = Path(out_dir) / "data"
    remove_stale_temps(data_dir)
    builtin = not cfg.data
    files = stdlib_files(cfg.corpus_mb) if builtin else expand_paths(cfg.data)
    if not builtin:  # `--data . --out out`: never read the run's own outputs (they change every run)
        out_abs = Path(out_dir).resolve()
        files = [f for f in files if not f.resolve().is_relative_to(out_abs)] or files
    reader = _Reader(files, builtin)
    ident = reader.identity()
    given = BPETokenizer.load(tokenizer_path) if tokenizer_path is not None else None
    cache = data_dir / _key({"inputs": ident, "vocab_size": cfg.vocab_size})  # the tokenizer trained here
    meta = _complete(cache)
    if given is not None and (meta is None or meta["tokenizer_fingerprint"] != given.fingerprint()):
        cache = data_dir / _key({"inputs": ident, "tokenizer": given.fingerprint()})
        meta = _complete(cache)
    if meta is None:
        meta = _build(cache, reader, cfg, given)
    for line in meta.get("warnings", []):  # again on a reused cache: the run trains without those files
        print(line, file=sys.stderr, flush=True)
    tok = given if given is not None else BPETokenizer.load(cache / "tokenizer.json")
    train = np.load(cache / "train.npy", mmap_mode="r", allow_pickle=False)
    val = np.load(cache / "val.npy", mmap_mode="r", allow_pickle=False)
    where = " ".join(cfg.data) if cfg.data else "(the built-in corpus)"
    train, val, to_val, to_train = _split(train, val, cfg.block_size + 1, where)
    text_bytes = lambda ids: len(tok.decode_bytes([int(i) for i in ids if i != tok.eot_id]))  # noqa: E731
    val_bytes = meta["val_bytes"] + text_bytes(to_val) - text_bytes(to_train)
    return TokenData(train, val, tok, val_bytes / max(len(val), 1))


def _bytes_per_token(tok, tokens, limit: int = 1_000_000) -> float:
    sample = np.asarray(tokens[:limit], dtype=np.int64).tolist()
    return len(tok.decode_bytes(sample)) / max(len(sample), 1)
