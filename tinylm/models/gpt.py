"""GPT: the GPT-2 architecture, with GPT-2's parameter names and initialisation.

Pre-LayerNorm blocks (x + attn(ln_1(x)), x + mlp(ln_2(x))), causal self-attention from one
fused qkv projection, a GELU MLP 4x wide, learned positions, and an LM head tied to the token
embedding (logits = x @ wte^T). Parameter names are GPT-2's (``wte``, ``wpe``, ``h.0.ln_1``,
``h.0.attn.c_attn``, ``h.0.attn.c_proj``, ``h.0.ln_2``, ``h.0.mlp.c_fc``, ``h.0.mlp.c_proj``,
``ln_f``) and linear weights are (in, out) like its Conv1D, so a Hugging Face GPT-2 checkpoint
loads with a name-by-name copy (``from_hf``).

Generation with a KV cache lives here too: ``generate`` runs the blocks on arrays under
``no_grad`` and keeps each layer's keys and values, so each new token costs one row of work.

Shape legend: B batch, T time, C n_embd, V vocab_size, NH n_head, hs = C / NH.
Leaves out: attention dropout (only embedding and residual dropout, as nanoGPT at dropout=0),
flash-decoding, beam search.
References: Radford et al. 2019 (GPT-2); nanoGPT's model.py for the layout.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np

import kernels
from tinylm import functional as F
from tinylm.backend import to_device, xp_of
from tinylm.nn import Embedding, LayerNorm, Linear, Module
from tinylm.tensor import Tensor, no_grad


@dataclass
class GPTConfig:
    n_layer: int = 4          # transformer blocks
    n_head: int = 4           # attention heads per block; n_embd must divide by it
    n_embd: int = 128         # channels (C)
    block_size: int = 128     # longest context (number of learned positions)
    vocab_size: int = 4096    # tokens, the LM head's width
    dropout: float = 0.0      # embedding and residual dropout while training
    bias: bool = True         # biases in linears and LayerNorms (GPT-2: True)
    dtype: str = "float32"    # parameter dtype ("float64" for gradient checks)

    def __post_init__(self):
        for f in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"GPTConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"GPTConfig.dtype must be 'float32' or 'float64', got {self.dtype!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown keys {unknown}")
        return cls(**d)


class CausalSelfAttention(Module):
    def __init__(self, cfg: GPTConfig, rng, proj_std: float, dtype):
        self.n_head = cfg.n_head
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, cfg.bias, rng, dtype=dtype)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, cfg.bias, rng, std=proj_std, dtype=dtype)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.c_proj(F.attention_qkv(self.c_attn(x), self.n_head))


class MLP(Module):
    def __init__(self, cfg: GPTConfig, rng, proj_std: float, dtype):
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, cfg.bias, rng, dtype=dtype)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, cfg.bias, rng, std=proj_std, dtype=dtype)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(Module):
    def __init__(self, cfg: GPTConfig, rng, dtype):
        # GPT-2 scales the init of the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer): two such writes per block, so the stream's variance stays put
        proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias, dtype=dtype)
        self.attn = CausalSelfAttention(cfg, rng, proj_std, dtype)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias, dtype=dtype)
        self.mlp = MLP(cfg, rng, proj_std, dtype)
        self.dropout = cfg.dropout

    def forward(self, x, rng=None):
        x = x + F.dropout(self.attn(self.ln_1(x)), self.dropout, self.training, rng)
        return x + F.dropout(self.mlp(self.ln_2(x)), self.dropout, self.training, rng)


class GPT(Module):
    def __init__(self, cfg: GPTConfig, seed: int = 0):
        self.config = cfg
        dtype = np.dtype(cfg.dtype)
        rng = np.random.default_rng(seed)
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd, rng, dtype=dtype)
        self.wpe = Embedding(cfg.block_size, cfg.n_embd, rng, std=0.01, dtype=dtype)
        self.h = [Block(cfg, rng, dtype) for _ in range(cfg.n_layer)]
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias, dtype=dtype)
        self.dropout_rng = np.random.default_rng(seed + 1)  # only used when dropout > 0

    # ---- training forward -------------------------------------------------------------------
    def __call__(self, idx, targets=None, ignore_index: int = -100):
        return self.forward(idx, targets, ignore_index)

    def forward(self, idx, targets=None, ignore_index: int = -100):
        """idx (B, T) integer ids -> (logits (B, T, V), mean cross-entropy or None)."""
        if isinstance(idx, Tensor):
            idx = idx.data
        if not hasattr(idx, "ndim"):
            idx = np.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"GPT: idx must be (B, T), got shape {idx.shape}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"GPT: sequence of length {T} is longer than block_size={self.config.block_size}")
        xp = xp_of(self.wte.weight.data)
        pos = xp.arange(T)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C) + (T, C)
        x = F.dropout(x, self.config.dropout, self.training, self.dropout_rng)
        for block in self.h:
            x = block(x, self.dropout_rng)
        x = self.ln_f(x)
        logits = F.linear_t(x, self.wte.weight)  # tied head: (B, T, C) @ (V, C)^T
        loss = None if targets is None else F.cross_entropy(logits, targets, ignore_index)
        return logits, loss

    def param_groups(self, weight_decay: float) -> list[dict]:
        """GPT-2 practice: decay the matrices and the token embedding (tied with the head);
        not the biases, LayerNorm weights or the position table."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (decay if p.ndim == 2 and name != "wpe.weight" else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def flops_per_token(self, T: int | None = None) -> float:
        """Training FLOPs per token: 6 N + 12 n_layer T C (N without the position table)."""
        c = self.config
        T = c.block_size if T is None else T
        n = self.num_params() - self.wpe.weight.size
        return 6.0 * n + 12.0 * c.n_layer * T * c.n_embd

    # ---- generation with a KV cache ---------------------------------------------------------
    def _forward_cached(self, idx, cache: list, start: int):
        """Run new tokens idx (B, Tn) at positions start.. through the model, appending their
        keys and values to ``cache`` (per layer (K, V) arrays of shape (B, NH, block_size, hs)).
        Returns the logits of the last position (B, V) as an array. No autograd."""
        c = self.config
        B, Tn = idx.shape
        nh, hs = c.n_head, c.n_embd // c.n_head
        with no_grad():
            x = self.wte(idx).data + self.wpe.weight.data[start : start + Tn]
            for layer, block in enumerate(self.h):
                h = block.ln_1(Tensor(x)).data
                qkv = block.attn.c_attn(Tensor(h)).data.reshape(B, Tn, 3, nh, hs).transpose(2, 0, 3, 1, 4)
                K, V = cache[layer]
                K[:, :, start : start + Tn] = qkv[1]
                V[:, :, start : start + Tn] = qkv[2]
                y = _attend(qkv[0], K[:, :, : start + Tn], V[:, :, : start + Tn], start)
                y = y.transpose(0, 2, 1, 3).reshape(B, Tn, c.n_embd)
                x = x + block.attn.c_proj(Tensor(y)).data
                x = x + block.mlp(block.ln_2(Tensor(x))).data
            x = self.ln_f(Tensor(x[:, -1])).data  # (B, C)
            return kernels.get("matmul", x)(x, self.wte.weight.data.T)

    def _new_cache(self, B: int) -> list:
        c = self.config
        xp = xp_of(self.wte.weight.data)
        shape = (B, c.n_head, c.block_size, c.n_embd // c.n_head)
        return [(xp.zeros(shape, self.wte.weight.dtype), xp.zeros(shape, self.wte.weight.dtype)) for _ in self.h]

    def generate_iter(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, seed: int | None = None, stop_tokens=(),
                      use_cache: bool = True) -> Iterator[np.ndarray]:
        """Yield the next token of each row (B,) one step at a time.

        With ``use_cache`` the prompt runs once and each new token costs one position; when the
        context fills, the cache restarts from the last half window (so past ``block_size``
        tokens a cached run conditions on at least block_size/2 tokens, while an uncached run
        always sees the last block_size). Prompts longer than the context are cropped.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        was_training = self.training
        self.eval()
        try:
            idx = np.array(idx, dtype=np.int64)
            if idx.ndim == 1:
                idx = idx[None]
            if idx.shape[1] == 0:
                raise ValueError("generate: the prompt is empty; give at least one token (e.g. the end-of-text id)")
            bs = self.config.block_size
            rng = np.random.default_rng(seed)
            stop = set(int(t) for t in stop_tokens)
            cache, pos = None, 0
            seq = idx
            for _ in range(max_new_tokens):
                if use_cache:
                    if cache is None or pos >= bs:
                        ctx = seq[:, -(bs // 2 if cache is not None else bs):]
                        cache = self._new_cache(seq.shape[0])
                        logits = self._forward_cached(_dev(self, ctx), cache, 0)
                        pos = ctx.shape[1]
                    else:
                        logits = self._forward_cached(_dev(self, seq[:, -1:]), cache, pos)
                        pos += 1
                else:
                    with no_grad():
                        logits = self.forward(_dev(self, seq[:, -bs:]))[0].data[:, -1]
                nxt = sample(to_device(logits, "cpu"), temperature, top_k, top_p, rng)
                seq = np.concatenate([seq, nxt[:, None]], axis=1)
                yield nxt
                if stop and all(int(t) in stop for t in nxt):
                    return
        finally:
            self.train(was_training)

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_tokens=(), use_cache: bool = True) -> np.ndarray:
        """Prompt ids (B, T) or (T,) -> (B, T + new) ids; stops early when every row has
        produced a stop token."""
        idx = np.array(idx, dtype=np.int64)
        idx2 = idx[None] if idx.ndim == 1 else idx
        new = list(self.generate_iter(idx2, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, use_cache))
        out = np.concatenate([idx2] + [t[:, None] for t in new], axis=1) if new else idx2
        return out[0] if idx.ndim == 1 else out

    # ---- Hugging Face GPT-2 layout ----------------------------------------------------------
    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> "GPT":
        """Load a Hugging Face GPT-2 directory (``config.json`` + ``model.safetensors``)."""
        from tinylm.models.hf import load_hf  # noqa: PLC0415

        return load_hf(cls, Path(path))

    def save_hf(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` in Hugging Face's GPT-2 layout."""
        from tinylm.models.hf import save_hf  # noqa: PLC0415

        save_hf(self, Path(path))

    def config_dict(self) -> dict:
        return asdict(self.config)


def _on_gpu(model: GPT) -> bool:
    return not isinstance(model.wte.weight.data, np.ndarray)


def _dev(model: GPT, a):
    return to_device(a, "gpu") if _on_gpu(model) else a


def _attend(q, K, V, start: int):
    """Attention of new queries q (B, NH, Tn, hs) at positions start.. over cached keys and
    values (B, NH, start + Tn, hs): query i may see keys j <= start + i."""
    xp = xp_of(q)
    Tn, L = q.shape[2], K.shape[2]
    s = (q @ K.swapaxes(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, NH, Tn, L)
    if Tn > 1:
        allowed = xp.arange(L)[None, :] <= (start + xp.arange(Tn))[:, None]
        s = xp.where(allowed, s, -xp.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = xp.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return p @ V


def sample(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None, rng) -> np.ndarray:
    """Pick one token per row of logits (B, V). temperature 0 is greedy; top_k keeps the k most
    likely; top_p keeps the smallest set whose probability reaches p (nucleus)."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sp = np.take_along_axis(p, order, axis=-1)
        keep_sorted = np.cumsum(sp, axis=-1) - sp < top_p  # keep while the mass before it < p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, axis=-1) < u).sum(axis=-1), p.shape[-1] - 1)
