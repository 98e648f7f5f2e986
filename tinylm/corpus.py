"""Tokens for training: from a prepared directory, from text files, or from the built-in corpus.

The built-in corpus is the source of Python's standard library, which every Python install
already has: its ``.py`` files in sorted path order (tests and site-packages left out) until
``corpus_mb`` megabytes. Each file is a document.

Text files (``--data a.txt dir/``) are tokenized here: a directory means every file under it.
A BPE tokenizer is trained on the training documents (unless one is given), documents are
split train/validation by index (every 20th to validation: deterministic), encoded with an
end-of-text token between documents, and cached as ``.npy`` in ``out_dir/data/`` keyed by the
inputs' paths, sizes and modification times, so a second run starts at once. A directory
written by ``tinylm prepare`` (cleaning, dedup, shards) is read as it is.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VAL_EVERY = 20  # every 20th document goes to validation


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
    out = []
    for s in paths:
        p = Path(s)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"--data {s}: no such file or directory")
    if not out:
        raise ValueError(f"--data {' '.join(paths)}: no files found")
    return out


def _read(p: Path) -> str:
    data = p.read_bytes()
    # invalid UTF-8 is replaced (U+FFFD), not fatal: one bad byte should not stop a run
    return data.decode("utf-8", errors="replace")


def get_tokens(cfg, out_dir: Path, tokenizer_path: Path | None = None) -> TokenData:
    from tinylm.tokenizer import BPETokenizer  # noqa: PLC0415

    if cfg.data and len(cfg.data) == 1 and Path(cfg.data[0]).is_dir():
        from tinylm import data as tdata  # noqa: PLC0415

        if tdata.is_prepared_dir(cfg.data[0]):
            prep = tdata.load_prepared(cfg.data[0])
            tok = BPETokenizer.load(tokenizer_path or prep.tokenizer_path)
            return TokenData(prep.train, prep.val, tok, _bytes_per_token(tok, prep.val))

    files = expand_paths(cfg.data) if cfg.data else stdlib_files(cfg.corpus_mb)
    key = hashlib.sha256(json.dumps({
        "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "vocab_size": cfg.vocab_size, "tokenizer": str(tokenizer_path) if tokenizer_path else None,
    }).encode()).hexdigest()[:16]
    cache = out_dir / "data" / key
    if (cache / "meta.json").is_file():
        meta = json.loads((cache / "meta.json").read_text())
        tok = BPETokenizer.load(cache / "tokenizer.json")
        return TokenData(np.load(cache / "train.npy", mmap_mode="r", allow_pickle=False),
                         np.load(cache / "val.npy", mmap_mode="r", allow_pickle=False), tok, meta["bytes_per_token"])

    docs = [_read(p) for p in files]
    docs = [d for d in docs if d.strip()]
    if len(docs) < VAL_EVERY:
        # too few documents to hold every 20th out: cut the text into 20 pieces at line ends
        lines = "".join(docs).splitlines(keepends=True)
        n = max(1, -(-len(lines) // VAL_EVERY))
        docs = ["".join(lines[i : i + n]) for i in range(0, len(lines), n)]
    train_docs = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    val_docs = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    if not train_docs or not val_docs:
        raise ValueError(f"--data: {len(docs)} non-empty documents is too few to split into train and validation")
    if tokenizer_path is not None:
        tok = BPETokenizer.load(tokenizer_path)
    else:
        print(f"training a {cfg.vocab_size}-token BPE tokenizer on {sum(map(len, train_docs)) / 1e6:.1f} MB "
              f"({len(train_docs)} documents)", flush=True)
        tok = BPETokenizer().train(train_docs, cfg.vocab_size, special_tokens=("<|endoftext|>",), progress=cfg.progress)
    train = _encode_docs(tok, train_docs)
    val = _encode_docs(tok, val_docs)
    bpt = sum(len(d.encode("utf-8")) for d in val_docs) / max(len(val), 1)
    tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "train.npy", train)
    np.save(tmp / "val.npy", val)
    tok.save(tmp / "tokenizer.json")
    (tmp / "meta.json").write_text(json.dumps({"files": len(files), "train_tokens": int(len(train)),
                                               "val_tokens": int(len(val)), "bytes_per_token": bpt}))
    if cache.exists():
        import shutil  # noqa: PLC0415

        shutil.rmtree(cache)
    tmp.rename(cache)
    return TokenData(np.load(cache / "train.npy", mmap_mode="r"), np.load(cache / "val.npy", mmap_mode="r"), tok, bpt)


def _encode_docs(tok, docs: list[str]) -> np.ndarray:
    eot = tok.eot_id
    ids: list[int] = []
    for enc in tok.encode_batch(docs, allowed_special="none"):
        ids.extend(enc)
        if eot is not None:
            ids.append(eot)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    return np.asarray(ids, dtype=dtype)


def _bytes_per_token(tok, tokens, limit: int = 1_000_000) -> float:
    sample = np.asarray(tokens[:limit], dtype=np.int64).tolist()
    return len(tok.decode_bytes(sample)) / max(len(sample), 1)
