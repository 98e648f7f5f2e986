"""GPT: the GPT-2 architecture, with GPT-2's parameter names and initialisation.

Pre-LayerNorm blocks (x + attn(ln_1(x)), x + mlp(ln_2(x))), causal self-attention from one
fused qkv projection, a GELU MLP 4x wide, learned positions, and an LM head tied to the token
embedding (logits = x @ wte^T). Parameter names are GPT-2's (``wte``, ``wpe``, ``h.0.ln_1``,
``h.0.attn.c_attn``, ``h.0.attn.c_proj``, ``h.0.ln_2``, ``h.0.mlp.c_fc``, ``h.0.mlp.c_proj``,
``ln_f``) and linear weights are (in, out) like its Conv1D, so a Hugging Face GPT-2 checkpoint
loads with a name-by-name copy (``from_hf``).

One forward serves training and generation (tinylm.models.base): with a KV cache the same
blocks run a few new tokens at a position, attending over the cached keys and values;
``tinylm.generate`` does the sampling for every model.

Shape legend: B batch, T time, C n_embd, V vocab_size, NH n_head, hs = C / NH.
Leaves out: attention dropout (only embedding and residual dropout, as nanoGPT at dropout=0),
flash-decoding, beam search.
References: Radford et al. 2019 (GPT-2); nanoGPT's model.py for the layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tinylm import functional as F
from tinylm.models.base import ConfigFromDict, LanguageModel
from tinylm.models.cache import KVCache
from tinylm.models.decode import gpt_step
from tinylm.nn import Embedding, LayerNorm, Linear, Module


@dataclass
class GPTConfig(ConfigFromDict):
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



class CausalSelfAttention(Module):
    def __init__(self, cfg: GPTConfig, rng, proj_std: float, dtype):
        self.n_head = cfg.n_head
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, cfg.bias, rng, dtype=dtype)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, cfg.bias, rng, std=proj_std, dtype=dtype)

    def forward(self, x, cache=None, layer: int = 0, start: int = 0):  # (B, T, C) -> (B, T, C)
        return self.c_proj(F.attention_qkv(self.c_attn(x), self.n_head, cache, layer, start))


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

    def forward(self, x, rng=None, cache=None, layer: int = 0, start: int = 0):
        x = x + F.dropout(self.attn(self.ln_1(x), cache, layer, start), self.dropout, self.training, rng)
        return x + F.dropout(self.mlp(self.ln_2(x)), self.dropout, self.training, rng)


class GPT(LanguageModel):
    def __init__(self, cfg: GPTConfig, seed: int = 0):
        self.config = cfg
        dtype = np.dtype(cfg.dtype)
        rng = np.random.default_rng(seed)
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd, rng, dtype=dtype)
        self.wpe = Embedding(cfg.block_size, cfg.n_embd, rng, std=0.01, dtype=dtype)
        self.h = [Block(cfg, rng, dtype) for _ in range(cfg.n_layer)]
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias, dtype=dtype)
        self.dropout_rng = np.random.default_rng(seed + 1)  # only used when dropout > 0

    # ---- the one forward: training, evaluation and generation -------------------------------
    def forward(self, idx, targets=None, cache=None, start=None, ignore_index: int = -100,
                return_logits: bool = True, head=None):
        """idx (B, T) integer ids -> (logits (B, T, V), mean cross-entropy or None); with
        targets and ``return_logits=False``, (None, loss) from the fused head + cross-entropy.

        With a KV cache (``new_cache``), the T tokens are at positions start.. (default
        cache.pos) and attend over the cached ones; the cache then holds start + T positions."""
        idx, start = self._check_input(idx, cache, start)
        if cache is not None and (fast := gpt_step(self, idx, cache, start, targets)) is not None:
            return fast, None  # one new token per row: one kernel call per block (models/decode.py)
        T = idx.shape[1]
        pos = self._dev(self._positions(start, T))
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C) + (T, C), or + (B, T, C) with a start per row
        x = F.dropout(x, self.config.dropout, self.training, self.dropout_rng)
        for layer, block in enumerate(self.h):
            x = block(x, self.dropout_rng, cache, layer, start)
        x = self.ln_f(x)
        self._advance(cache, start, T)
        return self._head(x, self.wte.weight, targets, ignore_index, return_logits, head)  # tied head: x @ wte^T

    def _any_weight(self):
        return self.wte.weight.data

    def new_cache(self, batch: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch, c.n_head, c.block_size, c.n_embd // c.n_head, self.wte.weight.compute_dtype,
                       self.xp)

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
