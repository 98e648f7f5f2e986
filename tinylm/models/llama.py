"""Llama: pre-RMSNorm blocks, rotary positions, a SwiGLU MLP and grouped-query attention.

    x = embed_tokens(idx)                                   (B, T, C); no position table
    per block:  h = x + o_proj(attn(rope(q), rope(k), v))   on input_layernorm(x)
                x = h + down_proj(swiglu(gate_proj(n), up_proj(n)))   n = post_attention_layernorm(h)
    logits = lm_head(norm(x))                               (tied to embed_tokens, or not)

Attention is causal with NH query heads and NKV key/value heads (NKV divides NH; query head h
reads kv head h // (NH / NKV)): the KV cache holds only NKV heads, the point of GQA. RoPE
rotates each head's channel pairs (i, i + hs/2) by angle pos * theta^(-2i/hs): Hugging Face's
half-split layout, so its checkpoints load unchanged (``rope_interleaved=True`` uses pairs
(2i, 2i + 1), the original paper's, equal up to a permutation of each head's channels).

Parameter names are Hugging Face's LlamaForCausalLM names without the ``model.`` prefix
(``embed_tokens``, ``layers.0.self_attn.q_proj``, ``layers.0.mlp.gate_proj``, ``norm``,
``lm_head``) and projections keep PyTorch's (out, in) layout, so ``from_hf`` is a copy by name.
No biases anywhere, as in Llama. The one forward (tinylm.models.base) serves training and
generation with a KV cache.

Shape legend: B batch, T time, C n_embd, NH n_head, NKV n_kv_head, hs = C / NH, F ffn_hidden.
Leaves out: RoPE scaling variants, sliding-window attention, dropout.
References: Touvron et al. 2023 (LLaMA); Su et al. 2021 (RoFormer); Ainslie et al. 2023 (GQA);
Shazeer 2020 (GLU variants).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kernels.rope import rope_tables
from tinylm import functional as F
from tinylm.models.base import ConfigFromDict, LanguageModel
from tinylm.models.cache import KVCache
from tinylm.models.decode import llama_step
from tinylm.nn import Embedding, Linear, Module, RMSNorm


@dataclass
class LlamaConfig(ConfigFromDict):
    n_layer: int = 4           # transformer blocks
    n_head: int = 4            # query heads; n_embd must divide by it, and n_embd / n_head be even
    n_kv_head: int = 4         # key/value heads (grouped-query attention); must divide n_head
    n_embd: int = 128          # channels (C)
    block_size: int = 128      # longest context (RoPE has no table limit; this sizes the cache)
    vocab_size: int = 4096
    ffn_hidden: int = 0        # SwiGLU hidden width; 0: 8/3 n_embd rounded up to a multiple of 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6     # RMSNorm epsilon (Hugging Face's rms_norm_eps)
    tie_embeddings: bool = False  # LM head shares embed_tokens (Llama 2/3: untied; small Llamas: tied)
    rope_interleaved: bool = False  # channel pairs (2i, 2i+1) instead of (i, i + hs/2)
    dtype: str = "float32"     # parameter dtype ("float64" for gradient checks)

    def __post_init__(self):
        for f in ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "vocab_size"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"LlamaConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"LlamaConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"LlamaConfig: head size n_embd/n_head={self.n_embd // self.n_head} must be even for RoPE")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"LlamaConfig: n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.ffn_hidden < 0:
            raise ValueError(f"LlamaConfig.ffn_hidden must be >= 0, got {self.ffn_hidden}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"LlamaConfig.dtype must be 'float32' or 'float64', got {self.dtype!r}")


    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 32 * math.ceil(8 * self.n_embd / 3 / 32)


class LlamaAttention(Module):
    def __init__(self, cfg: LlamaConfig, rng, dtype):
        C, hs = cfg.n_embd, cfg.n_embd // cfg.n_head
        self.n_head, self.n_kv_head, self.hs = cfg.n_head, cfg.n_kv_head, hs
        self.interleaved = cfg.rope_interleaved
        std_out = 0.02 / math.sqrt(2 * cfg.n_layer)  # writes into the residual stream (as GPT-2)
        self.q_proj = Linear(C, cfg.n_head * hs, False, rng, dtype=dtype, layout="out_in")
        self.k_proj = Linear(C, cfg.n_kv_head * hs, False, rng, dtype=dtype, layout="out_in")
        self.v_proj = Linear(C, cfg.n_kv_head * hs, False, rng, dtype=dtype, layout="out_in")
        self.o_proj = Linear(cfg.n_head * hs, C, False, rng, std=std_out, dtype=dtype, layout="out_in")

    def forward(self, x, cos, sin, cache=None, layer: int = 0, start: int = 0):  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_head, self.hs)
        k = self.k_proj(x).reshape(B, T, self.n_kv_head, self.hs)
        v = self.v_proj(x).reshape(B, T, self.n_kv_head, self.hs)
        if cos.ndim == 3:  # a position per row (batched decoding): rotate the B*T rows as one sequence
            cs, sn = cos.reshape(B * T, -1), sin.reshape(B * T, -1)
            q = F.rope(q.reshape(1, B * T, self.n_head, self.hs), cs, sn, self.interleaved).reshape(B, T, self.n_head, self.hs)
            k = F.rope(k.reshape(1, B * T, self.n_kv_head, self.hs), cs, sn, self.interleaved).reshape(
                B, T, self.n_kv_head, self.hs)
        else:
            q = F.rope(q, cos, sin, self.interleaved)
            k = F.rope(k, cos, sin, self.interleaved)
        q = q.transpose(0, 2, 1, 3)  # (B, NH, T, hs)
        k = k.transpose(0, 2, 1, 3)  # (B, NKV, T, hs)
        v = v.transpose(0, 2, 1, 3)
        y = F.causal_attention(q, k, v, cache, layer, start)  # (B, NH, T, hs)
        return self.o_proj(y.transpose(0, 2, 1, 3).reshape(B, T, C))


class LlamaMLP(Module):
    def __init__(self, cfg: LlamaConfig, rng, dtype):
        C, Fh = cfg.n_embd, cfg.hidden
        self.gate_proj = Linear(C, Fh, False, rng, dtype=dtype, layout="out_in")
        self.up_proj = Linear(C, Fh, False, rng, dtype=dtype, layout="out_in")
        self.down_proj = Linear(Fh, C, False, rng, std=0.02 / math.sqrt(2 * cfg.n_layer), dtype=dtype, layout="out_in")

    def forward(self, x):
        return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))


class LlamaBlock(Module):
    def __init__(self, cfg: LlamaConfig, rng, dtype):
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(cfg, rng, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(cfg, rng, dtype)

    def forward(self, x, cos, sin, cache=None, layer: int = 0, start: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(LanguageModel):
    def __init__(self, cfg: LlamaConfig, seed: int = 0):
        self.config = cfg
        dtype = np.dtype(cfg.dtype)
        rng = np.random.default_rng(seed)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.n_embd, rng, dtype=dtype)
        self.layers = [LlamaBlock(cfg, rng, dtype) for _ in range(cfg.n_layer)]
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.n_embd, cfg.vocab_size, False, rng, dtype=dtype,
                                                             layout="out_in")
        self.ffn_hidden = cfg.hidden
        hs = cfg.n_embd // cfg.n_head
        # RoPE angles for every position the model may see, computed once (float64, then cast)
        self._cos, self._sin = rope_tables(hs, np.arange(cfg.block_size), cfg.rope_theta, dtype)

    def _any_weight(self):
        return self.embed_tokens.weight.data

    def to(self, device: str) -> "Llama":
        super().to(device)
        from tinylm.backend import to_device  # noqa: PLC0415

        self._cos, self._sin = to_device(self._cos, device), to_device(self._sin, device)
        return self

    def forward(self, idx, targets=None, cache=None, start=None, ignore_index: int = -100,
                return_logits: bool = True, head=None):
        """idx (B, T) integer ids -> (logits (B, T, V), mean cross-entropy or None); with
        targets and ``return_logits=False``, (None, loss) from the fused head + cross-entropy;
        with a KV cache the T tokens sit at positions start.. (default cache.pos)."""
        idx, start = self._check_input(idx, cache, start)
        if cache is not None and (fast := llama_step(self, idx, cache, start, targets)) is not None:
            return fast, None  # one new token per row: one kernel call per block (models/decode.py)
        T = idx.shape[1]
        pos = self._dev(self._positions(start, T))  # (T,), or (B, T) with a start per row
        cos, sin = self._cos[pos], self._sin[pos]
        x = self.embed_tokens(idx)
        for layer, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, layer, start)
        x = self.norm(x)
        w_head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self._advance(cache, start, T)
        return self._head(x, w_head, targets, ignore_index, return_logits, head)  # x @ head^T

    def new_cache(self, batch: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch, c.n_kv_head, c.block_size, c.n_embd // c.n_head,
                       self.embed_tokens.weight.compute_dtype, self.xp)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Decay the matrices (projections, embedding, head); not the RMSNorm weights."""
        decay, no_decay = [], []
        for _, p in self.named_parameters():
            (decay if p.ndim == 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def flops_per_token(self, T: int | None = None) -> float:
        """Training FLOPs per token: 6 N + 12 n_layer T C (N counts the tied head once)."""
        c = self.config
        T = c.block_size if T is None else T
        return 6.0 * self.num_params() + 12.0 * c.n_layer * T * c.n_embd
