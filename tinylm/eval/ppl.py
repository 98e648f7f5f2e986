"""Perplexity: nats per token, perplexity and bits per byte of a text, two ways.

The text is one token stream: each document is preceded by the end-of-text token (as in
training, where it separates documents), so every token of every document is predicted, and
the separators are context only: they are not scored. Bits per byte = (sum of the scored
tokens' losses in nats) / ln 2 / (UTF-8 bytes of the documents), a number that does not depend
on the tokenizer.

Windows over a stream of N tokens (N - 1 targets; window W <= the model's block_size):

- non-overlapping: windows start at 0, W, 2W, ...; each scores all its W targets, so the first
  targets of each window see little context.
- sliding, stride S (1 <= S <= W): windows start at 0, S, 2S, ... and each scores only the
  targets that no earlier window scored (the others are context, target -100), so after the
  first window every target sees at least W - S tokens of context. With S = W it is the
  non-overlapping plan exactly (Hugging Face's "perplexity of fixed-length models" recipe).

Each window's loss comes from the model's forward and ``F.cross_entropy`` with ignore_index
-100, summed over the window's scored targets in float64.

Leaves out: documents scored in isolation (a window may span a document boundary; the
separator tells the model a new document starts, as in training).
"""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

from tinylm.eval.common import PAD, sha256_ids


def plan_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a stream of n tokens -> [(begin, end, first)]: the model reads tokens
    [begin, end), predicting targets begin+1..end, and scores the targets first..end (those
    before ``first`` were scored by an earlier window).

    n=10, window=4, stride=4 -> [(0, 4, 1), (4, 8, 5), (8, 9, 9)]
    n=10, window=4, stride=2 -> [(0, 4, 1), (2, 6, 5), (4, 8, 7), (6, 9, 9)]"""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 1 and 1 <= stride <= window, got window={window}, stride={stride}")
    if n < 2:
        raise ValueError(f"{n} tokens: nothing to predict (need at least 2)")
    out, begin, scored_to = [], 0, 0
    while scored_to < n - 1:
        end = min(begin + window, n - 1)
        if end > scored_to:
            out.append((begin, end, scored_to + 1))
            scored_to = end
        begin += stride
    return out


def score_stream(model, tokens, window: int, stride: int, scored=None, batch_size: int = 8,
                 per_window: bool = False) -> dict:
    """Sum of losses of a stream's targets under one window plan.

    tokens (N,) ids; scored (N,) bool or None: which targets count (index = target position;
    scored[0] is unused). -> {"nll": nats summed, "tokens": targets scored, "windows", and with
    ``per_window`` "windows_detail": [(begin, end, first, nll, n)]}."""
    from tinylm import functional as F  # noqa: PLC0415
    from tinylm.backend import to_device  # noqa: PLC0415
    from tinylm.tensor import Tensor, no_grad  # noqa: PLC0415

    if window > model.config.block_size:
        raise ValueError(f"window {window} is longer than the model's context (block_size={model.config.block_size})")
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    keep = np.ones(n, dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    plan = plan_windows(n, window, stride)
    total, count, detail = 0.0, 0, []
    was = model.training
    model.eval()
    try:
        with no_grad():
            # windows of one length batch together (all but the last one or two are full length)
            groups: dict[int, list] = {}
            for w in plan:
                groups.setdefault(w[1] - w[0], []).append(w)
            for T, ws in groups.items():
                for b0 in range(0, len(ws), batch_size):
                    batch = ws[b0:b0 + batch_size]
                    x = np.stack([tokens[b:e] for b, e, _ in batch])
                    y = np.stack([tokens[b + 1:e + 1] for b, e, _ in batch])
                    for r, (b, e, first) in enumerate(batch):
                        y[r, :first - b - 1] = PAD                      # context: scored earlier
                        y[r, ~keep[b + 1:e + 1]] = PAD                  # separators
                    logits = model(x)[0].values()  # float32 (a 16-bit run's logits decoded once)
                    for r, (b, e, first) in enumerate(batch):
                        k = int((y[r] != PAD).sum())
                        if k == 0:
                            detail.append((b, e, first, 0.0, 0))
                            continue
                        row = Tensor(logits[r])  # (T, V): the loss of one window, its mean x k
                        nll = float(to_device(F.cross_entropy(row, model._dev(y[r]), PAD).data, "cpu")) * k
                        total += nll
                        count += k
                        if per_window:
                            detail.append((b, e, first, nll, k))
    finally:
        model.train(was)
    out = {"nll": total, "tokens": count, "windows": len(plan)}
    if per_window:
        out["windows_detail"] = sorted(detail)
    return out


def summarize(nll: float, tokens: int, n_bytes: int | None) -> dict:
    """nats/token, perplexity and bits per byte of a summed loss."""
    npt = nll / tokens if tokens else float("nan")
    return {"nats_per_token": npt, "perplexity": math.exp(npt) if tokens else float("nan"),
            "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
            "nll_sum": nll, "tokens_scored": tokens, "bytes_scored": n_bytes}


def perplexity(model, tokens, scored=None, n_bytes: int | None = None, window: int | None = None,
               stride: int | None = None, batch_size: int = 8, per_window: bool = False) -> dict:
    """Both plans on one stream -> {"non_overlapping": {...}, "sliding": {...}} with nats per
    token, perplexity, bits per byte (with ``n_bytes``), window, stride and windows each.
    Defaults: window = block_size, stride = window / 2."""
    window = model.config.block_size if window is None else int(window)
    stride = max(1, window // 2) if stride is None else int(stride)
    res = {}
    for name, s in (("non_overlapping", window), ("sliding", stride)):
        r = score_stream(model, tokens, window, s, scored, batch_size, per_window)
        res[name] = {**summarize(r["nll"], r["tokens"], n_bytes), "window": window, "stride": s,
                     "windows": r["windows"]}
        if per_window:
            res[name]["windows_detail"] = r["windows_detail"]
    return res


# ---- inputs: text files, a prepared directory, the built-in corpus's held-out files ---------

def read_texts(paths: list[str]) -> tuple[list[str], list[str]]:
    """Documents of text files -> (texts, file names): a plain file is one document; ``.jsonl``
    (optionally ``.gz``) gives the "text" field of each line; ``.gz`` is decompressed."""
    from tinylm.eval.common import read_jsonl  # noqa: PLC0415

    texts, names = [], []
    for s in paths:
        p = Path(s)
        files = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")) if p.is_dir() else [p]
        if not p.exists():
            raise FileNotFoundError(f"{s}: no such file or directory")
        for f in files:
            stem = f.name[:-3] if f.name.endswith(".gz") else f.name
            if stem.endswith(".jsonl"):
                for n, row in enumerate(read_jsonl(f), 1):
                    if not isinstance(row.get("text"), str):
                        raise ValueError(f"{f}, record {n}: no string 'text' field")
                    texts.append(row["text"])
                    names.append(f"{f}:{n}")
                continue
            raw = gzip.open(f).read() if f.name.endswith(".gz") else f.read_bytes()
            texts.append(raw.decode("utf-8", errors="replace"))
            names.append(str(f))
    if not texts:
        raise ValueError(f"{' '.join(paths)}: no documents found")
    return texts, names


def builtin_heldout(corpus_mb: float = 6.0) -> tuple[list[str], list[str]]:
    """The built-in corpus's validation documents: every 20th of the standard-library files that
    ``tinylm train`` reads (each file is one document there), which training never sees."""
    from tinylm.corpus import VAL_EVERY, stdlib_files  # noqa: PLC0415

    texts, names = [], []
    docs = [(f, f.read_text(encoding="utf-8", errors="replace")) for f in stdlib_files(corpus_mb)]
    docs = [(f, t) for f, t in docs if t.strip()]  # the reader drops blank documents before counting
    for i, (f, t) in enumerate(docs):
        if i % VAL_EVERY == VAL_EVERY - 1:
            texts.append(t)
            names.append(str(f))
    if not texts:
        raise ValueError(f"corpus_mb={corpus_mb}: {len(docs)} files, fewer than the {VAL_EVERY} that hold one out")
    return texts, names


def stream_of_texts(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """[eot] doc1 [eot] doc2 ... -> (tokens, scored mask, UTF-8 bytes of the documents)."""
    eot = tok.eot_id if tok.eot_id is not None else 0
    ids, keep = [eot], [False]
    for t in texts:
        enc = tok.encode(t, allowed_special="none")
        ids.extend(enc)
        keep.extend([True] * len(enc))
        ids.append(eot)
        keep.append(False)
    ids, keep = ids[:-1], keep[:-1]  # no separator after the last document
    return np.asarray(ids, dtype=np.int64), np.asarray(keep), sum(len(t.encode("utf-8")) for t in texts)


def stream_of_prepared(tok, path, split: str = "val", max_tokens: int | None = None):
    """A ``tinylm prepare`` directory's split -> (tokens, scored mask, bytes, manifest)."""
    from tinylm.data import load_prepared  # noqa: PLC0415
    from tinylm.tokenizer import BPETokenizer  # noqa: PLC0415

    prep = load_prepared(path)
    theirs = BPETokenizer.load(prep.tokenizer_path)
    if theirs.fingerprint() != tok.fingerprint():
        raise ValueError(f"{path}: its tokenizer is not the checkpoint's; the tokens would mean other text")
    stream = prep.train if split == "train" else prep.val
    n = len(stream) if max_tokens is None else min(len(stream), max_tokens)
    body = np.asarray(stream[0:n], dtype=np.int64)
    eot = prep.eot_id
    tokens = np.concatenate([[eot], body])
    keep = tokens != eot
    n_bytes = 0
    for i in range(0, len(body), 1 << 16):
        chunk = body[i:i + (1 << 16)]
        n_bytes += len(tok.decode_bytes([int(t) for t in chunk if t != eot]))
    return tokens, keep, n_bytes, prep.manifest


def data_record(tokens, keep, names: list[str]) -> dict:
    return {"tokens_sha256": sha256_ids(tokens), "tokens": int(len(tokens)), "scored_targets": int(keep[1:].sum()),
            "documents": len(names), "sources": [n for n in names[:5] if n] + ([f"... {len(names) - 5} more"]
                                                                          if len(names) > 5 and names[5] else [])}
