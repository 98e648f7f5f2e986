"""The data pipeline: inputs -> clean -> filter -> dedup -> split -> tokenize -> shards + manifest.

Passes (each streams; memory is bounded by batch sizes, plus the dedup indexes, which grow
with the number of documents kept and not with their size, see dedup.py):

1. **clean** (worker processes): documents come out of ``sources.iter_documents`` in input
   order and go to the workers in batches of ~``batch_bytes``; each worker cleans and filters
   its batch and computes the exact key, the split hash and (for ``dedup="near"``) the MinHash
   signature. The main process takes the results back *in order* and decides duplicates
   (first occurrence wins), then appends each kept document to ``docs.bin`` in the output's
   temporary directory (length-prefixed UTF-8; the corpus is on disk once more while the
   run lasts). At most ``2 * workers`` batches are in flight: ``Pool.imap`` would read the
   whole input ahead into its task queue and grow without bound.
2. **tokenizer**: the one given, or a BPE tokenizer trained on the kept *train* documents
   (at most ``tokenizer_train_bytes`` of them, in order), saved as ``tokenizer.json``.
3. **tokenize** (worker processes): ``docs.bin`` is read back in batches, encoded, and each
   document followed by the end-of-text token is appended to its split's shard stream.

**Split.** A document goes to validation when ``u < val_fraction``, where ``u`` in [0, 1) is a
keyed BLAKE2b hash (key: ``seed``) of its whitespace-normalised text: the split depends on the
text and the seed only, not on input order or worker count. If that leaves validation empty
while two or more documents are kept, the document with the smallest ``u`` goes there (so a
one-file corpus still gets a validation split).

**Determinism.** Workers return results in submission order and every decision that depends
on earlier documents is taken in the main process, so the shards are byte-identical for any
number of workers (tested: 1 vs 2).

**Atomicity.** Everything is written into ``.<out>.tmp-<pid>`` next to ``out`` and renamed
into place at the end; an interrupted run leaves no half-written prepared directory.

Leaves out: resuming an interrupted run, appending to an existing prepared directory, and
mixing weights between sources.
"""
from __future__ import annotations

import hashlib
import itertools
import multiprocessing as mp
import os
import shutil
import struct
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tinylm.data import shards as sh
from tinylm.data.clean import CleanConfig, clean_document
from tinylm.data.dedup import ExactDedup, NearDedup, exact_key, normalize_for_key
from tinylm.data.report import build_report, settings_dict, short_issues
from tinylm.data.sources import Issues, SourceOptions, iter_documents, list_files

DEDUP_MODES = ("exact", "near", "off")
_REC = struct.Struct("<dQ")  # (split hash u, byte length) ahead of each document in docs.bin


@dataclass(frozen=True)
class PrepareConfig:
    val_fraction: float = 0.05
    shard_tokens: int = 1 << 24         # 32 MiB per uint16 shard
    workers: int = 1
    dedup: str = "exact"                # exact | near (exact, then MinHash) | off
    near_threshold: float = 0.8         # Jaccard similarity of word shingles (verified exactly)
    num_perm: int = 128
    shingle: int = 5                    # words per shingle
    seed: int = 0
    vocab_size: int = 4096              # when a tokenizer is trained here
    tokenizer_train_bytes: int = 1 << 28  # BPE training reads at most this much train text
    batch_bytes: int = 1 << 20          # text per worker task
    clean: CleanConfig = field(default_factory=CleanConfig)
    sources: SourceOptions = field(default_factory=SourceOptions)

    def check(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.dedup not in DEDUP_MODES:
            raise ValueError(f"dedup must be one of {', '.join(DEDUP_MODES)}, got {self.dedup!r}")
        if self.shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {self.shard_tokens}")
        if self.sources.chunk_bytes < 16:  # 4x of it must hold a whole separator (13 bytes)
            raise ValueError(f"chunk_bytes must be >= 16, got {self.sources.chunk_bytes}")
        if not -(1 << 63) <= self.seed < 1 << 63:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if self.vocab_size < 257:
            raise ValueError(f"vocab_size must exceed the 256 byte tokens, got {self.vocab_size}")


def split_hash(text: str, seed: int, norm: bytes | None = None) -> float:
    """u in [0, 1) from the whitespace-normalised text and the seed (order independent)."""
    norm = normalize_for_key(text) if norm is None else norm
    key = seed.to_bytes(8, "little", signed=True)
    d = hashlib.blake2b(norm, digest_size=8, key=key).digest()
    return (int.from_bytes(d, "little") >> 11) / float(1 << 53)


# ---- worker side: module globals set once per process by _init_worker --------------------
_W: dict = {}


def _init_worker(cfg: PrepareConfig) -> None:
    _W.clear()
    _W["cfg"] = cfg
    if cfg.dedup == "near":
        _W["near"] = NearDedup(cfg.near_threshold, cfg.num_perm, cfg.shingle, cfg.seed)


def _clean_batch(batch: list) -> tuple[list, dict, int]:
    cfg: PrepareConfig = _W["cfg"]
    near = _W.get("near")
    stats: dict = {}
    out = []
    for text, src, line in batch:
        clean, words = clean_document(text, cfg.clean, stats)
        if clean is None:
            out.append(None)
            continue
        sig = near.signature(clean, words) if near is not None else None
        norm = normalize_for_key(clean)
        out.append((clean, exact_key(clean, norm), split_hash(clean, cfg.seed, norm), sig, src, line))
    return out, stats, sum(len(t) for t, _, _ in batch)


def _encode_batch(task: tuple) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(tokenizer class, file, [(text, is_val)]) -> train ids, val ids (each doc then eot), doc counts.

    The tokenizer is loaded once per process, on its first batch: one pool serves both passes.
    Ids come back in the shard dtype (uint16 for most vocabularies): a quarter of the int64
    bytes to pickle across the process boundary.
    """
    tok_cls, tok_path, batch = task
    if _W.get("tok_path") != tok_path:
        _W["tok"], _W["tok_path"] = tok_cls.load(tok_path), tok_path
    tok = _W["tok"]
    texts = [t for t, _ in batch]
    is_val = np.array([v for _, v in batch], dtype=bool)
    # "none": a literal "<|endoftext|>" inside a document is text, not a document boundary
    flat = getattr(tok, "encode_batch_flat", None)
    if flat is not None:
        # (ids, ends) straight from the kernel: encode_batch's per-document lists cost more
        # than the encoding itself (48 MB of random-word text: tolist 1.17 s + np.asarray
        # 1.54 s against 1.52 s in the BPE kernel)
        ids, ends = flat(texts, allowed_special="none")
        ids, ends = np.asarray(ids, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    else:
        lists = tok.encode_batch(texts, allowed_special="none")
        ends = np.cumsum([len(x) for x in lists], dtype=np.int64)
        # chain.from_iterable keeps the loop in C: a generator expression here took 10.8 s
        # for 38M ids (profiled), chain ~9 ns per id like per-list np.asarray
        ids = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(ends[-1]))
    n = len(texts)
    eot_at = ends + np.arange(n)                 # where each document's eot lands
    stream = np.empty(ids.shape[0] + n, dtype=np.int64)
    is_token = np.ones(stream.shape[0], dtype=bool)
    is_token[eot_at] = False
    stream[is_token] = ids
    stream[eot_at] = tok.eot_id
    if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
        raise ValueError(f"tokenizer produced an id outside [0, {tok.vocab_size})")
    lengths = np.diff(np.concatenate([[0], ends])) + 1
    val_token = np.repeat(is_val, lengths)
    dtype = sh.token_dtype(tok.vocab_size)
    n_val = int(is_val.sum())
    return stream[~val_token].astype(dtype), stream[val_token].astype(dtype), n - n_val, n_val


def _context():
    """forkserver where the OS has it, else spawn; never plain fork (unless asked for with
    ``TINYLM_MP_START=fork|spawn|forkserver``).

    Forking the caller's process copies whatever threads it holds (OpenBLAS, a Numba threading
    layer left by training code, tqdm's monitor) in an unknown state; the fork server is a
    clean single-threaded process that imports this module once (preload) and forks workers
    from there. Measured on the 5.3 MB benchmark corpus (tinyshakespeare + KJV: docs/
    performance.md, "Benchmark corpora"), 2 workers, one run each while other jobs kept the
    load at 6-7 on 2 cores (so +-50%): spawn 6.1 s, forkserver without preload
    4.1 s, with preload 2.9 and 4.5 s, fork 3.3 s. The preload list is process-wide: other
    forkserver users in the same process also get this module imported.
    """
    method = os.environ.get("TINYLM_MP_START", "")
    if method:
        if method not in mp.get_all_start_methods():
            raise ValueError(f"TINYLM_MP_START={method!r}: this OS offers {mp.get_all_start_methods()}")
        return mp.get_context(method)
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["tinylm.data.pipeline"])
        return ctx
    return mp.get_context("spawn")


class _Runner:
    """In-process for one worker; otherwise a process pool (see _context) with a bounded in-flight window."""

    def __init__(self, workers: int, initargs: tuple):
        self.workers = workers
        if workers == 1:
            _init_worker(*initargs)
            self.pool = None
        else:
            self.pool = _context().Pool(workers, _init_worker, initargs)

    def map(self, fn, items):
        if self.pool is None:
            yield from map(fn, items)
            return
        pending: deque = deque()
        for item in items:
            pending.append(self.pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None
        _W.clear()

    def terminate(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
        _W.clear()


def _batches(docs, batch_bytes: int, max_docs: int = 4096):
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d[0])
        if size >= batch_bytes or len(batch) >= max_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _progress(total, desc, unit, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, leave=False)


def _read_docs(path: Path):
    with open(path, "rb") as f:
        while True:
            head = f.read(_REC.size)
            if not head:
                return
            u, n = _REC.unpack(head)
            yield u, f.read(n).decode("utf-8")


class _Kept:
    """Where each kept document came from (file, line) and where it sits in docs.bin:
    20 bytes per document, for the duplicate examples and for near-dup verification."""

    def __init__(self, docs_path: Path):
        self.files: list[str] = []
        self.file_ids: dict = {}
        self.fid = np.empty(1024, np.int32)
        self.line = np.empty(1024, np.int64)
        self.offset = np.empty(1024, np.int64)
        self.docs_path = docs_path
        self.reader = None

    def set(self, doc_id: int, src: str, line: int, offset: int) -> None:
        if doc_id >= self.fid.shape[0]:
            self.fid, self.line, self.offset = (np.concatenate([a, np.empty_like(a)])
                                                for a in (self.fid, self.line, self.offset))
        if src not in self.file_ids:
            self.file_ids[src] = len(self.files)
            self.files.append(src)
        self.fid[doc_id] = self.file_ids[src]
        self.line[doc_id] = line
        self.offset[doc_id] = offset

    def where(self, doc_id: int) -> dict:
        return {"file": self.files[self.fid[doc_id]], "line": int(self.line[doc_id])}

    def text(self, doc_id: int) -> str:
        # the writer is flushed by the caller before any fetch
        if self.reader is None:
            self.reader = open(self.docs_path, "rb")
        self.reader.seek(int(self.offset[doc_id]))
        _, n = _REC.unpack(self.reader.read(_REC.size))
        return self.reader.read(n).decode("utf-8")

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def _clean_pass(runner, files, cfg: PrepareConfig, tmp: Path, issues: Issues, total_bytes: int, progress: bool) -> dict:
    """Pass 1: clean, filter, dedup; write kept documents to tmp/docs.bin. -> pass summary."""
    stats: dict = {}
    exact = ExactDedup() if cfg.dedup != "off" else None
    near = NearDedup(cfg.near_threshold, cfg.num_perm, cfg.shingle, cfg.seed) if cfg.dedup == "near" else None
    kept = _Kept(tmp / "docs.bin")
    examples: list = []
    s = {"documents": 0, "chars_read": 0, "kept": 0, "kept_chars": 0, "n_val": 0,
         "min_u": 2.0, "exact_duplicates": 0, "near_duplicates": 0}
    bar = _progress(total_bytes, "clean+dedup", "B", progress)
    try:
        docs = iter_documents(files, cfg.sources, issues)
        with open(tmp / "docs.bin", "wb") as out:

            def fetch(doc_id: int) -> str:
                out.flush()
                return kept.text(doc_id)

            for results, batch_stats, raw_chars in runner.map(_clean_batch, _batches(docs, cfg.batch_bytes)):
                for k, v in batch_stats.items():
                    stats[k] = stats.get(k, 0) + v
                s["documents"] += len(results)
                for r in results:
                    if r is None:
                        continue
                    text, key, u, sig, src, line = r
                    doc_id = s["kept"]
                    dup = exact.find(key) if exact is not None else None
                    kind = "exact"
                    if dup is None and near is not None:
                        dup, kind = near.check(sig, doc_id, text, fetch), "near"
                    if exact is not None and (dup is None or kind == "near"):
                        exact.add(key, doc_id if dup is None else dup)  # see ExactDedup
                    if dup is not None:
                        s[f"{kind}_duplicates"] += 1
                        if len(examples) < 20:
                            examples.append({"kind": kind, "file": src, "line": line,
                                             "duplicate_of": kept.where(dup)})
                        continue
                    kept.set(doc_id, src, line, out.tell())
                    data = text.encode("utf-8")
                    out.write(_REC.pack(u, len(data)))
                    out.write(data)
                    s["kept"] += 1
                    s["kept_chars"] += len(text)
                    s["n_val"] += u < cfg.val_fraction
                    s["min_u"] = min(s["min_u"], u)
                bar.update(raw_chars)  # characters, against a total in bytes: close enough for a bar
                s["chars_read"] += raw_chars
    finally:
        bar.close()
        kept.close()
    s["stats"] = stats
    s["dedup_examples"] = examples
    if near is not None:
        s["near_candidates"] = near.candidates
        s["lsh"] = {"bands": near.bands, "rows": near.rows}
    s["index_bytes"] = ((exact.table.nbytes if exact else 0) + (near.nbytes if near else 0)
                        + kept.fid.nbytes + kept.line.nbytes + kept.offset.nbytes)
    return s


def _train_texts(tmp: Path, cutoff: float, limit: int):
    used = 0
    for u, text in _read_docs(tmp / "docs.bin"):
        if u < cutoff:
            continue
        if used >= limit:
            return
        used += len(text)
        yield text


def _tokenizer(tokenizer, cfg: PrepareConfig, tmp: Path, cutoff: float, progress: bool):
    """Load, copy or train the tokenizer into tmp/tokenizer.json -> (tokenizer, how)."""
    dest = tmp / sh.TOKENIZER
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        tokenizer.save(dest)  # any object with the BPETokenizer API
        return tokenizer, "given"
    from tinylm.tokenizer import BPETokenizer

    if tokenizer is None:
        tok = BPETokenizer()
        tok.train(_train_texts(tmp, cutoff, cfg.tokenizer_train_bytes), cfg.vocab_size,
                  special_tokens=("<|endoftext|>",), progress=progress)
        tok.save(dest)
        return tok, "trained"
    tok = BPETokenizer.load(tokenizer)
    shutil.copyfile(tokenizer, dest)
    return tok, f"loaded from {tokenizer}"


def _tokenize_pass(runner, tok, cfg: PrepareConfig, tmp: Path, cutoff: float, n_docs: int, progress: bool):
    if tok.eot_id is None:
        raise ValueError("the tokenizer has no <|endoftext|> special token to put between documents")
    dtype = sh.token_dtype(tok.vocab_size)
    writers = {False: sh.ShardWriter(tmp, "train", cfg.shard_tokens, dtype),
               True: sh.ShardWriter(tmp, "val", cfg.shard_tokens, dtype)}
    items = ((text, u < cutoff) for u, text in _read_docs(tmp / "docs.bin"))
    path = str(tmp / sh.TOKENIZER)
    if runner.pool is None:
        _W["tok"], _W["tok_path"] = tok, path  # in-process: use the object we have
    tasks = ((type(tok), path, b) for b in _batches(items, cfg.batch_bytes))
    bar = _progress(n_docs, "tokenize", "doc", progress)
    try:
        for train_ids, val_ids, n_train, n_val in runner.map(_encode_batch, tasks):
            for is_val, ids, n in ((False, train_ids, n_train), (True, val_ids, n_val)):
                writers[is_val].add_stream(ids, n)
            bar.update(n_train + n_val)
        for w in writers.values():
            w.close()
    finally:
        bar.close()
    return {("val" if k else "train"): w for k, w in writers.items()}, dtype


def _check_out(out: Path, overwrite: bool) -> None:
    """Raise unless out is absent, an empty directory, or prepared data we may overwrite."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if any(out.iterdir()):
        if not sh.is_prepared_dir(out):
            raise ValueError(f"{out} exists, is not empty and is not a prepared directory")
        if not overwrite:
            raise ValueError(f"{out} already holds prepared data (pass overwrite=True / --overwrite)")


def _place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename tmp into out; an existing prepared (or empty) out is replaced only if allowed."""
    _check_out(out, overwrite)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


def prepare(inputs, out_dir, tokenizer=None, *, val_fraction: float = 0.05, shard_tokens: int = 1 << 24,
            workers: int = 1, dedup: str = "exact", redact: bool = False, seed: int = 0,
            progress: bool = True, vocab_size: int = 4096, include=(), exclude=(),
            text_field: str = "text", near_threshold: float = 0.8, num_perm: int = 128,
            overwrite: bool = False, clean: CleanConfig | None = None, **more) -> dict:
    """Prepare ``inputs`` (files/directories) into ``out_dir``; returns the report dict.

    ``tokenizer``: None (train a BPE tokenizer of ``vocab_size`` on the train documents), a
    tokenizer file, or a tokenizer object. ``more``: other ``PrepareConfig`` fields
    (``shingle``, ``batch_bytes``, ``tokenizer_train_bytes``, ``chunk_bytes``).
    With ``workers > 1`` the workers are new processes that import the caller's main module, so
    a script calling this needs the usual ``if __name__ == "__main__":`` guard.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    chunk = more.pop("chunk_bytes", SourceOptions.chunk_bytes)
    clean = clean or CleanConfig()
    if redact != clean.redact:
        clean = CleanConfig(**{**asdict(clean), "redact": redact})
    cfg = PrepareConfig(val_fraction=val_fraction, shard_tokens=shard_tokens, workers=workers, dedup=dedup,
                        near_threshold=near_threshold, num_perm=num_perm, seed=seed, vocab_size=vocab_size,
                        clean=clean, sources=SourceOptions(text_field, tuple(include), tuple(exclude), chunk),
                        **more)
    cfg.check()
    out = Path(out_dir)
    _check_out(out, overwrite)  # fail before any work is done
    files = list_files(inputs, cfg.sources)
    total_bytes = 0
    for f in files:
        try:
            total_bytes += os.stat(f).st_size
        except OSError:
            pass  # reported as unreadable by the clean pass
    from tinylm.distributed import world  # noqa: PLC0415 [distributed #14] None: one process

    comm = world()
    if comm is not None and comm.rank > 0:  # this rank cleans its share of the batches for rank 0
        from tinylm.distributed.prepare import serve_clean  # noqa: PLC0415

        return serve_clean(comm, files, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    issues = Issues()
    runner = None
    try:
        if comm is None:
            runner = _Runner(cfg.workers, (cfg,))
        else:  # [distributed #14] the ranks clean the batches; rank 0 decides and writes everything
            from tinylm.distributed.prepare import MPIRunner  # noqa: PLC0415

            runner = MPIRunner(comm, cfg)
        p1 = _clean_pass(runner, files, cfg, tmp, issues, total_bytes, progress)
        t1 = time.perf_counter()
        cutoff = cfg.val_fraction
        warnings = []
        if cfg.val_fraction > 0 and p1["n_val"] == 0:
            if p1["kept"] >= 2:
                cutoff = float(np.nextafter(p1["min_u"], 2.0))  # the smallest-u document only
            else:
                warnings.append("fewer than 2 documents kept: the validation split is empty")
        if p1["kept"] == 0:
            raise ValueError("no documents left after cleaning, filtering and dedup; see the report: "
                             + short_issues(issues, p1))
        tok, how = _tokenizer(tokenizer, cfg, tmp, cutoff, progress)
        t2 = time.perf_counter()
        writers, dtype = _tokenize_pass(runner, tok, cfg, tmp, cutoff, p1["kept"], progress)
        runner.close()
        (tmp / "docs.bin").unlink()
        t3 = time.perf_counter()
        report = build_report(files, total_bytes, p1, issues, writers, cfg, warnings, (t0, t1, t2, t3))
        manifest = {
            "format": sh.FORMAT, "version": sh.VERSION, "dtype": np.dtype(dtype).name,
            "tokenizer": {"file": sh.TOKENIZER, "fingerprint": tok.fingerprint(), "vocab_size": int(tok.vocab_size),
                          "eot_id": int(tok.eot_id), "source": how},
            "eot_between_documents": "after each document",
            "settings": settings_dict(cfg),
            "shards": {k: w.shards for k, w in writers.items()},
            "report": report,
        }
        sh.write_manifest(tmp, manifest)
        _place(tmp, out, overwrite)
    except BaseException:
        if runner is not None:
            runner.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if comm is not None:  # [distributed #14]
        from tinylm.distributed.prepare import finish  # noqa: PLC0415

        finish(comm, report)
    return report
