"""Generation, written once for every model: sampling, top-k/top-p, stop tokens, the KV cache,
streaming.

A model only has to offer the one forward of tinylm.models.base (``model(idx, cache=c,
start=p)`` -> logits), ``new_cache(batch)`` and ``config.block_size``. Then:

    generate_iter(model, prompt_ids, n)  yields the next token of every row, one step at a time
    generate(model, prompt_ids, n)       returns prompt + new tokens
    stream_text(model, tok, "def ", n)   yields decoded text pieces as tokens arrive (UTF-8 safe)

With ``use_cache`` the prompt runs once (prefill) and each new token costs one position;
without it, every step reruns the whole window (the reference the cached path is tested
against). When the context fills, the cache restarts from the last half window, so past
``block_size`` tokens a cached run conditions on at least block_size/2 tokens, while an
uncached run always sees the last block_size.

Leaves out: beam search, speculative decoding, rows of different lengths in one batch.
"""
from __future__ import annotations

import codecs
from typing import Iterator

import numpy as np

from tinylm.backend import to_device
from tinylm.tensor import autocast, no_grad


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Reject bad sampling settings before anything is printed or computed."""
    if not temperature >= 0:  # also catches NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None, rng) -> np.ndarray:
    """Pick one token per row of logits (B, V). temperature 0 is greedy; top_k keeps the k most
    likely; top_p keeps the smallest set whose probability reaches p (nucleus)."""
    if temperature == 0:  # float32 -> float64 is exact and keeps the order: argmax of the logits as given
        return np.asarray(logits).argmax(axis=-1)
    logits = np.asarray(logits, dtype=np.float64)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        p = np.where(nucleus(p, top_p), p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, axis=-1) < u).sum(axis=-1), p.shape[-1] - 1)


def nucleus_ref(p: np.ndarray, top_p: float) -> np.ndarray:
    """The tokens top-p keeps (B, V) bool: in order of probability (ties by index), each token
    whose preceding mass is < top_p. The reference: a full sort of every row."""
    order = np.argsort(-p, axis=-1, kind="stable")
    sp = np.take_along_axis(p, order, axis=-1)
    keep_sorted = np.cumsum(sp, axis=-1) - sp < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep


def nucleus(p: np.ndarray, top_p: float, first: int = 64) -> np.ndarray:
    """``nucleus_ref`` without sorting the vocabulary: the nucleus is usually a few dozen
    tokens, so each row takes its ``m`` most likely (``argpartition``, O(V)), sorts those, and
    doubles ``m`` until the tokens strictly more likely than the m-th already hold ``top_p``.
    Then no other token can be kept (its preceding mass includes all of them), and every token
    above the m-th has the same preceding mass as in the full sort: the result is identical."""
    B, V = p.shape
    keep = np.zeros(p.shape, dtype=bool)
    for r in range(B):
        row, m = p[r], min(first, V)
        while True:
            if m >= V:
                keep[r] = nucleus_ref(row[None], top_p)[0]
                break
            cand = np.argpartition(-row, m - 1)[:m]
            cand = cand[np.lexsort((cand, -row[cand]))]  # by probability, ties by index
            pc = row[cand]
            above = pc > pc[-1]
            if pc[above].sum() >= top_p:
                before = np.cumsum(pc) - pc
                keep[r, cand[above & (before < top_p)]] = True
                break
            m *= 4
    return keep


def _last_logits(model, ids, cache, start):
    logits, _ = model(model._dev(ids), cache=cache, start=start)
    return to_device(logits.values()[:, -1], "cpu")


def generate_iter(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int | None = None, stop_tokens=(),
                  use_cache: bool = True) -> Iterator[np.ndarray]:
    """Yield the next token of each row (B,) one step at a time.

    Stops early once every row has produced one of ``stop_tokens`` (a row that has stopped
    keeps producing tokens until the others stop; callers cut each row at its stop token).
    Prompts longer than the context are cropped to the last block_size tokens.
    """
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    idx = np.array(idx, dtype=np.int64)
    if idx.ndim == 1:
        idx = idx[None]
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError("generate: the prompt is empty; give at least one token (e.g. the end-of-text id)")
    was_training = model.training
    model.eval()
    from tinylm.amp.formats import decoded_weights  # noqa: PLC0415 (amp imports the engine)

    try:
        bs = model.config.block_size
        rng = np.random.default_rng(seed)
        stop = set(int(t) for t in stop_tokens)
        done = np.zeros(idx.shape[0], dtype=bool)
        cache, seq = None, idx
        # float32 throughout: the KV cache is; a 16-bit working copy (a run's store) is decoded once
        with no_grad(), autocast(None), decoded_weights(model):
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits = _last_logits(model, seq[:, -bs:], None, None)
                elif cache is None or cache.pos >= bs:  # (re)fill: the prompt, or the last half window
                    ctx = seq[:, -(bs // 2 if cache is not None else bs):]
                    cache = model.new_cache(seq.shape[0])
                    logits = _last_logits(model, ctx, cache, 0)
                else:
                    logits = _last_logits(model, seq[:, -1:], cache, cache.pos)
                nxt = sample(logits, temperature, top_k, top_p, rng)
                seq = np.concatenate([seq, nxt[:, None]], axis=1)
                yield nxt
                if stop:
                    done |= np.isin(nxt, list(stop))
                    if done.all():
                        return
    finally:
        model.train(was_training)


def generate(model, idx, max_new_tokens: int, **kw) -> np.ndarray:
    """Prompt ids (B, T) or (T,) -> (B, T + new) ids (the same keywords as generate_iter)."""
    idx = np.array(idx, dtype=np.int64)
    idx2 = idx[None] if idx.ndim == 1 else idx
    new = list(generate_iter(model, idx2, max_new_tokens, **kw))
    out = np.concatenate([idx2] + [t[:, None] for t in new], axis=1) if new else idx2
    return out[0] if idx.ndim == 1 else out


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from end-of-text (or id 0)."""
    if prompt:
        return tokenizer.encode(prompt, allowed_special="all")
    return [tokenizer.eot_id if tokenizer.eot_id is not None else 0]


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int, stop_tokens=None, **kw) -> Iterator[str]:
    """Yield decoded text as tokens arrive (not including the prompt); a multi-byte character
    split across tokens comes out whole. Stops at end-of-text (or ``stop_tokens``)."""
    ids = prompt_ids(tokenizer, prompt)
    if stop_tokens is None:
        stop_tokens = () if tokenizer.eot_id is None else (tokenizer.eot_id,)
    stop = set(int(t) for t in stop_tokens)
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for nxt in generate_iter(model, [ids], max_new_tokens, stop_tokens=stop, **kw):
        t = int(nxt[0])
        if t in stop:
            break
        piece = dec.decode(tokenizer.decode_bytes([t]))
        if piece:
            yield piece
    tail = dec.decode(b"", final=True)
    if tail:
        yield tail
