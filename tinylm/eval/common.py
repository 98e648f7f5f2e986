"""What every evaluation task shares: scoring token sequences, settings records, error bars, files.

- ``sequence_logprobs(model, seqs, score_from)``: log p(seq[t] | seq[:t]) of the tokens each
  sequence scores, from one forward per batch (no autograd), in float64 from the float32 logits.
- ``checkpoint_info(dir)``: what a result records about the model it came from (path, step, the
  SHA-256 of its weights as state.json lists it), so a number names the exact weights.
- ``sha256_ids(ids)``: the hash of a token sequence, a result's "data hash".
- ``bootstrap_stderr(values)``: the standard error of a mean by resampling examples.
- ``write_json`` / ``write_jsonl``: written to a temporary and renamed, so a result file is
  whole or absent.

Leaves out: padding-free packing of several short sequences into one row (lm-eval does not do it
either); sequences are right-padded, which a causal model cannot see.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

PAD = -100  # target of a position that is not scored (F.cross_entropy's ignore_index)


def sha256_ids(ids) -> str:
    """SHA-256 of token ids as little-endian int32: the same ids give the same hash whatever
    array type or dtype held them."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(ids), dtype="<i4").tobytes()).hexdigest()


def sha256_text(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def checkpoint_info(ckpt_dir) -> dict:
    """{"path", "step", "model_type", "model_config", "model_sha256"} of a checkpoint directory
    (the link resolved, so the record names the step directory the weights were read from)."""
    from tinylm.train.checkpoint import read_state  # noqa: PLC0415

    p = Path(ckpt_dir)
    state = read_state(p)
    return {"path": str(p), "resolved": str(p.resolve()), "step": state.get("step"),
            "model_type": state.get("model_type", "gpt"), "model_config": state.get("model_config"),
            "model_sha256": state.get("sha256", {}).get("model.safetensors")}


def model_info(model) -> dict:
    """For a model that did not come from a checkpoint: its type, config and parameter count."""
    return {"model_type": getattr(model, "model_type", "?"), "model_config": model.config_dict()
            if hasattr(model, "config_dict") else None, "params": int(model.num_params())
            if hasattr(model, "num_params") else None}


def bootstrap_stderr(values, n_boot: int = 1000, seed: int = 0) -> float:
    """Standard error of ``mean(values)``: the standard deviation of the means of ``n_boot``
    resamples of the examples with replacement (seeded, so a result is reproducible). For 0/1
    values it approaches sqrt(p (1 - p) / n)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for i in range(0, n_boot, 100):  # 100 resamples at a time: (100, n) indices
        k = min(100, n_boot - i)
        means[i:i + k] = v[rng.integers(0, v.size, (k, v.size))].mean(axis=1)
    return float(means.std(ddof=1))


def logsumexp_rows(x: np.ndarray) -> np.ndarray:  # (N, V) float64 -> (N,)
    m = x.max(axis=-1)
    return m + np.log(np.exp(x - m[:, None]).sum(axis=-1))


def sequence_logprobs(model, seqs: list, score_from: list, batch_size: int = 8, greedy: bool = False) -> list:
    """Per-token log-probabilities of each sequence's scored tokens (with ``greedy``, also whether
    each scored token is the model's most likely one: lm-eval's ``is_greedy``).

    seqs[i] is a list of ids of length L_i (2 <= L_i <= block_size + 1); the model reads
    seqs[i][:-1] and token t (score_from[i] <= t < L_i) is scored by log p(seq[t] | seq[:t]).
    -> [np.ndarray (L_i - score_from[i],) float64] (with ``greedy``: [(logp, is_greedy)]). Sequences are batched longest first
    (similar lengths share a batch, so little padding is computed)."""
    from tinylm.backend import to_device  # noqa: PLC0415
    from tinylm.tensor import no_grad  # noqa: PLC0415

    bs = model.config.block_size
    for i, (s, f) in enumerate(zip(seqs, score_from)):
        if not 2 <= len(s) <= bs + 1:
            raise ValueError(f"sequence {i}: {len(s)} tokens; the model reads 2..block_size + 1 = {bs + 1}")
        if not 1 <= f < len(s):
            raise ValueError(f"sequence {i}: score_from={f} must be in [1, {len(s)})")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list = [None] * len(seqs)
    was = model.training
    model.eval()
    try:
        with no_grad():
            for b0 in range(0, len(order), batch_size):
                rows = order[b0:b0 + batch_size]
                T = len(seqs[rows[0]]) - 1
                x = np.zeros((len(rows), T), dtype=np.int64)
                for r, i in enumerate(rows):
                    x[r, :len(seqs[i]) - 1] = seqs[i][:-1]
                logits, _ = model(x)
                lg = to_device(logits.values(), "cpu")  # (B, T, V) (float32 values of a 16-bit run's logits too)
                for r, i in enumerate(rows):
                    s, f = seqs[i], score_from[i]
                    z = lg[r, f - 1:len(s) - 1].astype(np.float64)  # rows predicting tokens f..L-1
                    tgt = np.asarray(s[f:], dtype=np.int64)
                    lp = z[np.arange(len(tgt)), tgt] - logsumexp_rows(z)
                    out[i] = (lp, bool((z.argmax(axis=-1) == tgt).all())) if greedy else lp
    finally:
        model.train(was)
    return out


def _atomic_write(path, text: str) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _clean(x):
    """JSON cannot hold NaN or infinity: they become null (a missing standard error reads as null)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _clean(x.item())
    return x


def write_json(path, obj) -> None:
    _atomic_write(path, json.dumps(_clean(obj), indent=1, allow_nan=False) + "\n")


def write_jsonl(path, rows) -> None:
    _atomic_write(path, "".join(json.dumps(_clean(r), allow_nan=False) + "\n" for r in rows))


def read_jsonl(path) -> list[dict]:
    """Rows of a JSONL file (``.gz`` decompressed); a bad line is a ValueError naming file and line."""
    import gzip  # noqa: PLC0415

    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    rows = []
    with opener(p, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}, line {n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{p}, line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def complete(model, tok, prompt: str, n: int = 1, max_new_tokens: int = 128, stop=(), temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = 0,
             with_ended: bool = False) -> list:
    """``n`` completions of one prompt, sampled together as n rows of one batch, each cut before
    the first of the ``stop`` strings (or end-of-text); generation ends once every row stopped.

    The prompt is encoded once; a prompt longer than the context keeps its last block_size
    tokens (tinylm.generate). Text is decoded from the bytes of each row's tokens, so a stop
    string spread over several tokens is found."""
    from tinylm.generate import generate_iter, prompt_ids  # noqa: PLC0415

    ids = prompt_ids(tok, prompt)
    eot = tok.eot_id
    rows = [bytearray() for _ in range(n)]
    done = [False] * n
    texts = [""] * n
    stop = tuple(s for s in stop if s)
    for nxt in generate_iter(model, [ids] * n, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed):
        for r in range(n):
            if done[r]:
                continue
            t = int(nxt[r])
            if eot is not None and t == eot:
                done[r] = True
                continue
            rows[r] += tok.decode_bytes([t])
            text = rows[r].decode("utf-8", errors="replace")
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                text, done[r] = text[:cut], True
            texts[r] = text
        if all(done):
            break
    return list(zip(texts, done)) if with_ended else texts
