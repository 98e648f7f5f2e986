"""The one-token decoding step of GPT and Llama, one kernel call per block (generation's fast path).

``GPT.forward`` and ``Llama.forward`` call ``step(model, idx, cache, start)`` when a forward is
one new token per row over a KV cache with no gradient wanted; it returns the logits
(B, 1, V) as a Tensor, or None when the step does not apply, and the forward then runs the
general block code. The general path and this one compute the same thing (each op's math,
kernels/decode.py), tested equal in tests/test_decode.py with ``ENABLED = False`` as the
reference.

Applies when: T = 1, no targets, grad disabled (``no_grad``), NumPy weights of float32 or
float64, every projection a plain ``tinylm.nn.Linear`` (LoRA adapters and 16-bit weights take
the general path), no dropout in training mode, and ``TINYLM_KERNELS`` unset or "ref" ("ref"
runs the NumPy reference of the fused step; "gpu", and CuPy weights, the general path: the GPU
composes the existing GPU kernels, see kernels/decode.py). The weights are read from the modules
at every step (an optimizer or ``load_state_dict`` may have replaced them between calls); the
scratch arrays live in the KV cache (``cache.work``), so a step allocates only the logits and
the new residual row.

Version log (``benchmarks/train_step.py --configs M --llama-configs M --rounds 2 --blas-env both
--no-profile --only-gen --gen-general``: config M, a 16-token prompt + 200 new tokens, greedy;
tokens/s of each one's fastest round, tinylm's general path, its fused step and PyTorch
alternating in one run; batch 8 counts all 8 rows' tokens. The run of 2026-12-07 03:46 had the
2 cores under load average 9-11 from other jobs: its float32 GEMM ceiling measured 28 GFLOP/s
against 213 on a quiet machine, so every figure is far below a quiet machine's and only the
ratios within the run mean something):
  v0 general path (a Tensor, a Function and one or more kernel calls per op, ~35 per block,
     each a parallel region): as-is GPT-M 5.9 tokens/s (PyTorch 7.4), llama-M 2.2 (PyTorch 7.1).
     The README's last quiet run: GPT-M 169.5 vs PyTorch 175.2 (0.97x), llama-M 186.5 vs 172.9.
  v1 this module: one Numba call per block and one for the head (kernels/decode.py), run on one
     thread or all by measured speed, scratch in the cache, greedy = argmax of the float32
     logits. Same run, as-is (OPENBLAS_CORETYPE=Haswell):
       GPT-M   batch 1: tinylm 42.7, PyTorch 7.4 tokens/s: 5.80x (general path 5.9: 7.2x faster)
       llama-M batch 1: tinylm 41.3, PyTorch 7.1 tokens/s: 5.82x (general path 2.2: 19x faster)
       GPT-M   batch 8: tinylm 180.6 tokens/s = 4.23x its batch 1; PyTorch 15.4 = 2.10x; 11.7x PyTorch
       llama-M batch 8: tinylm 161.5 tokens/s = 3.91x its batch 1; PyTorch 8.7 = 1.23x; 18.5x PyTorch
     Same run, unset (both variables removed; OpenBLAS still reported "Haswell" and a 30 GFLOP/s
     ceiling; the load fell during its last rounds, so rows compare only within a round pair):
       GPT-M   batch 1: tinylm 37.1, PyTorch 11.1 tokens/s: 3.35x (general path 5.0)
       llama-M batch 1: tinylm 100.1, PyTorch 20.6 tokens/s: 4.86x (general path 34.7)
       GPT-M   batch 8: tinylm 173.4 tokens/s = 4.67x its batch 1; PyTorch 25.3 = 2.29x; 6.85x PyTorch
       llama-M batch 8: tinylm 497.0 tokens/s = 4.96x its batch 1; PyTorch 185.5 = 9.00x; 2.68x PyTorch
     Greedy tokens equal to PyTorch's for all 200 (batch 1, and row 0 of batch 8). Most of the
     gain under load is fewer parallel regions (7 per block -> the runner's one thread when
     that measures faster) and no per-op Python; on a quiet machine one GPT-M block measured
     0.21-0.44 ms (2 threads) / 0.25-0.39 ms (1 thread), the head ~0.3 ms, so about 2.5 ms per
     token with the rest of the step, against PyTorch's 5.7 ms in the README's quiet run: not
     measured end to end on a quiet machine in this session.
"""
from __future__ import annotations

import os

import numpy as np

from tinylm.nn import LayerNorm, Linear, RMSNorm
from tinylm.tensor import Tensor, is_grad_enabled

# tests set it False to get the general path as the reference; TINYLM_FAST_DECODE=0 does the same
# for a whole process (benchmarks/train_step.py --gen-general: the before/after comparison)
ENABLED = os.environ.get("TINYLM_FAST_DECODE", "1").strip() != "0"


def _variant(name: str):
    forced = os.environ.get("TINYLM_KERNELS", "").strip().lower()
    if forced not in ("", "auto", "ref"):
        return None  # "gpu" (or a bad value, which the registry reports): the general path
    from kernels import decode  # noqa: PLC0415 (imports Numba)

    return decode.VARIANTS[name]["ref" if forced == "ref" else "cpu"]


def _plain(*mods) -> bool:
    return all(type(m) in (Linear, LayerNorm, RMSNorm) for m in mods)


def _arr(p, dt):
    """A parameter's array for the kernel (C-contiguous, the model's dtype), or None."""
    a = p.data
    if type(a) is not np.ndarray or a.dtype != dt:
        return None
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _zeros(cache, n, dt):
    key = ("zeros", n, dt.str)
    z = cache.work.get(key)
    if z is None:
        z = cache.work[key] = np.zeros(n, dt)
    return z


def _prepare(model, idx, cache, start, targets):
    """(B, pos (B,) int64, dtype) when the fast step applies, else None."""
    if not ENABLED or cache is None or targets is not None or is_grad_enabled() or idx.shape[1] != 1:
        return None
    if not isinstance(idx, np.ndarray) or not isinstance(cache.k[0], np.ndarray):
        return None
    dt = model._any_weight().dtype
    if dt not in (np.float32, np.float64) or cache.k[0].dtype != dt:
        return None
    B = idx.shape[0]
    if B != cache.batch:
        raise ValueError(f"KV cache: built for batch {cache.batch}, got {B} rows")
    pos = np.full(B, start, np.int64) if isinstance(start, (int, np.integer)) else np.asarray(start, np.int64)
    if int(pos.min()) < 0 or int(pos.max()) + 1 > cache.max_len:
        raise ValueError(f"KV cache: positions {int(pos.min())}..{int(pos.max())} do not fit in its {cache.max_len}")
    if not hasattr(cache, "work"):
        cache.work = {}
    return B, pos, dt


def gpt_step(model, idx, cache, start, targets=None):
    """GPT: logits (B, 1, V) of one new token per row, or None (see the module docstring)."""
    prep = _prepare(model, idx, cache, start, targets)
    if prep is None or (model.training and model.config.dropout > 0):
        return None
    B, pos, dt = prep
    blocks = model.h
    if not all(_plain(b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.c_proj) for b in blocks):
        return None
    block_fn, head_fn = _variant("gpt_block"), _variant("head")
    if block_fn is None:
        return None
    C = model.config.n_embd
    params = []
    for b in blocks:
        mods = (b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.c_proj)
        p = []
        for m in mods:
            w = _arr(m.weight, dt)
            bias = m.bias if m.bias is not None else None
            p += [w, _zeros(cache, w.shape[-1] if isinstance(m, Linear) else C, dt) if bias is None else _arr(bias, dt)]
        if any(a is None for a in p) or b.ln_1.eps != b.ln_2.eps:
            return None
        params.append((tuple(p), b.ln_1.eps))
    wte, wpe = _arr(model.wte.weight, dt), _arr(model.wpe.weight, dt)
    lnf_w = _arr(model.ln_f.weight, dt)
    lnf_b = _zeros(cache, C, dt) if model.ln_f.bias is None else _arr(model.ln_f.bias, dt)
    if wte is None or wpe is None or lnf_w is None or lnf_b is None:
        return None
    x = wte[idx[:, 0]] + wpe[pos]  # (B, C)
    for layer, (p, eps) in enumerate(params):
        x = block_fn(x, pos, p, cache.k[layer], cache.v[layer], eps, cache.work)
    logits = head_fn(x, lnf_w, lnf_b, model.ln_f.eps, wte, False, cache.work)
    model._advance(cache, start, 1)
    return Tensor(logits[:, None, :])


def llama_step(model, idx, cache, start, targets=None):
    """Llama: logits (B, 1, V) of one new token per row, or None (see the module docstring)."""
    prep = _prepare(model, idx, cache, start, targets)
    if prep is None:
        return None
    B, pos, dt = prep
    layers = model.layers
    if not all(_plain(b.input_layernorm, b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj,
                      b.self_attn.o_proj, b.post_attention_layernorm, b.mlp.gate_proj, b.mlp.up_proj,
                      b.mlp.down_proj) for b in layers):
        return None
    if model.lm_head is not None and not _plain(model.lm_head):
        return None
    block_fn, head_fn = _variant("llama_block"), _variant("head")
    if block_fn is None:
        return None
    if not isinstance(model._cos, np.ndarray) or model._cos.dtype != dt:
        return None
    params = []
    for b in layers:
        a, m = b.self_attn, b.mlp
        p = tuple(_arr(t.weight, dt) for t in (b.input_layernorm, a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                                              b.post_attention_layernorm, m.gate_proj, m.up_proj, m.down_proj))
        if any(t is None for t in p) or b.input_layernorm.eps != b.post_attention_layernorm.eps:
            return None
        params.append((p, b.input_layernorm.eps, a.interleaved))
    emb = _arr(model.embed_tokens.weight, dt)
    head = emb if model.lm_head is None else _arr(model.lm_head.weight, dt)
    norm_w = _arr(model.norm.weight, dt)
    if emb is None or head is None or norm_w is None:
        return None
    x = emb[idx[:, 0]]  # (B, C), a fresh array (the blocks update it in place)
    for layer, (p, eps, inter) in enumerate(params):
        x = block_fn(x, pos, p, cache.k[layer], cache.v[layer], model._cos, model._sin, inter, eps, cache.work)
    logits = head_fn(x, norm_w, None, model.norm.eps, head, True, cache.work)
    model._advance(cache, start, 1)
    return Tensor(logits[:, None, :])
