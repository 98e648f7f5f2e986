"""Benchmark: one full training step (forward, backward, clip, AdamW) and KV-cache generation,
tinylm against the same GPT (and the same Llama) written in PyTorch (CPU, eager), in one run.

Configs (issue 5):   S: 4 layers, 4 heads, 128 wide, T=128, B=16, V=1024
                     M: 6 layers, 6 heads, 384 wide, T=256, B=8,  V=8192
                     L: 12 layers, 12 heads, 768 wide, T=256, B=4, V=50304 (GPT-2 124M)
Llama rows (``--llama-configs``, default M): the same widths, depths, T, B and V as a Llama
(RMSNorm, RoPE, SwiGLU with 8/3 C hidden, untied head, no biases) with grouped-query attention
(n_head / 3 kv heads: 2 at M); the PyTorch side is the same Llama in eager mode with SDPA
(``enable_gqa``), weights read from tinylm's ``save_hf`` output.

How it measures, so the ratios mean something on a noisy 2-core machine:
- every (config, framework) runs in its own fresh subprocess, one after the other, with the same
  thread count for everything (``--threads``, default 2): TINYLM_NUM_THREADS / NUMBA_NUM_THREADS
  / OPENBLAS_NUM_THREADS / OMP_NUM_THREADS in the environment, ``kernels._threads.set_num_threads``
  when that module exists, else ``numba.set_num_threads``; ``torch.set_num_threads`` for PyTorch;
- the PyTorch model starts from tinylm's initial weights (tinylm writes them with ``save_hf``;
  the torch worker reads them with safetensors, without importing tinylm), and both train on the
  same token batches, so the first losses must agree: the table prints both as a check that the
  two programs compute the same thing;
- a step is timed from the forward to the end of ``zero_grad`` (tinylm's forward as the Trainer
  calls it, ``return_logits=False``: the fused LM head + cross-entropy, kernels/head_ce.py, whose
  forward also computes the head's gradients); ``--warmup`` steps (which include
  Numba's JIT loading and first-touch page faults) are excluded; the median of ``--steps`` is
  reported, with the forward / backward / clip / optimizer parts (medians of each part);
- peak memory is the process's peak resident set (Linux ``VmHWM``), reset with
  ``/proc/self/clear_refs`` after imports and a tiny warm-up step (so interpreter, library and
  JIT-compiler memory is the baseline, not the measurement), then read after the last step: it
  covers building the model and optimizer and all the steps. "growth" is that peak minus the
  resident set at the reset; "peak" is the whole process. Where clear_refs cannot be written,
  ``ru_maxrss`` is used instead and the table says so;
- GFLOP/s = flops_per_token * tokens / s, with flops_per_token = 6 N + 12 n_layer T C
  (N: parameters without the position table, the tied head counted once; docs/performance.md,
  "PyTorch reference points");
- ``--rounds R`` runs the (tinylm, PyTorch) pair R times alternating and keeps each one's
  fastest round: on a shared machine a burst of someone else's load then hits both alike;
- generation: config M, batch 1, a 16-token prompt, greedy, ``--gen-tokens`` new tokens with a
  KV cache (tinylm's ``generate_iter``; a plain KV-cache loop over the same weights in torch);
  tokens/s over the new tokens, the prompt's prefill included; the two token sequences are
  compared (same weights, greedy: they agree until a near-tie in float32 rounding). Then batch
  ``--gen-batch`` (default 8: several sequences in one cache, each its own 16-token prompt),
  tokens/s counting every row's tokens, against the same framework's batch 1. The rounds
  (``--rounds``) alternate tinylm and PyTorch, batch 1 and batch B, and keep each one's fastest;
  ``--only-gen`` runs the generation part alone (no training steps); ``--gen-general`` adds
  tinylm's batch 1 through its general block code (TINYLM_FAST_DECODE=0), the path before the
  fused one-token step (tinylm/models/decode.py).
- the OpenBLAS override: these machines set OPENBLAS_CORETYPE=Haswell and OPENBLAS_L2_SIZE=512
  (docs/performance.md), which make NumPy's OpenBLAS run its AVX2 kernels on an AVX-512 CPU. A
  user's machine has no such override. ``--blas-env both`` (the default) runs every measurement
  twice: with the environment as it is, and with both variables removed from the workers'
  environment (never from tests or CI). Each mode prints the kernel OpenBLAS chose
  (``openblas_get_corename``, threadpoolctl's "architecture") and the machine's float32 GEMM
  ceiling measured in that mode (np.matmul 4096^3 on OpenBLAS's own threads, best of 3), and the
  table gives each training step's GFLOP/s as a share of it. PyTorch's CPU build uses MKL, which
  the variables do not touch (on this AMD CPU MKL runs its generic AVX2 path); the same worker
  times PyTorch's GEMM on the same matrices, and the line prints OpenBLAS/PyTorch: a step that
  were all GEMM could be at most about that many times PyTorch's speed;
- the per-op profile (config M by default; ``--profile-config S`` for another, ``--no-profile``
  for none) runs two more tinylm steps with every Function's forward and backward timed, and
  prints where the step goes per op (Linear split by weight shape).

- ``--dtypes fp32,bf16,fp16`` (mixed precision): instead of PyTorch, tinylm's own step in each
  format through the Trainer's path (ParamStore with fp32 masters and a 16-bit working copy,
  the forward under autocast so the activations are 16-bit, fp16 loss scaling), the rounds
  alternating over the formats: step time and peak memory growth against fp32, and bytes per
  parameter as the store holds them against the ZeRO paper's 16. ``--batch N`` runs every
  config at N sequences a step (16-bit storage saves the activations' half; the parameter
  state is 16 bytes a weight either way, so the saving grows with the batch).

Usage: .venv/bin/python benchmarks/train_step.py [--configs S,M,L] [--steps N] [--warmup W]
       [--threads 2] [--gen-tokens 200] [--gen-batch 8] [--no-gen | --only-gen] [--no-profile]
       [--profile-config M] [--json FILE]
L needs ~3-4 GB and a minute or more per framework on 2 cores: leave it out with --configs S,M.
PyTorch is optional: without it only tinylm's columns are printed.
Leaves out: GPU (a later issue), torch.compile (43 s to compile at M, no faster: docs/performance.md,
"PyTorch reference points").
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# benchmarks/kernels.py (the kernel benchmark) would shadow the ``kernels`` package if this
# script's folder stayed first on sys.path
if sys.path and os.path.abspath(sys.path[0] or ".") == HERE:
    sys.path[0] = ROOT

CONFIGS = {
    "S": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch=16, vocab_size=1024),
    "M": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=8, vocab_size=8192),
    "L": dict(n_layer=12, n_head=12, n_embd=768, block_size=256, batch=4, vocab_size=50304),
}
DEFAULT_STEPS = {"S": 10, "M": 6, "L": 3}


def config_of(name: str) -> dict:
    """"M" -> the GPT config M; "llama-M" -> the Llama of the same size (GQA: n_head / 3 kv heads)."""
    if name.startswith("llama-"):
        c = dict(CONFIGS[name[len("llama-"):]], model="llama")
        c["n_kv_head"] = c["n_head"] // 3 if c["n_head"] % 3 == 0 else c["n_head"] // 2
        c["ffn_hidden"] = 32 * -(-8 * c["n_embd"] // (3 * 32))
        return c
    return dict(CONFIGS[name], model="gpt")


def base_name(name: str) -> str:
    return name[len("llama-"):] if name.startswith("llama-") else name
N_BATCHES = 4          # distinct token batches, cycled: the same in both frameworks
PROMPT_LEN = 16
LR, BETAS, WD, CLIP = 3e-4, (0.9, 0.95), 0.1, 1.0


def flops_per_token(c: dict) -> float:
    C, L = c["n_embd"], c["n_layer"]
    if c.get("model") == "llama":
        kv = c["n_kv_head"] * (C // c["n_head"])
        n = 2 * c["vocab_size"] * C + L * (2 * C * C + 2 * C * kv + 3 * C * c["ffn_hidden"] + 2 * C) + C
        return 6.0 * n + 12.0 * L * c["block_size"] * C
    n = c["vocab_size"] * C + L * (12 * C * C + 13 * C) + 2 * C  # wte + blocks + ln_f
    return 6.0 * n + 12.0 * L * c["block_size"] * C


def batches(c: dict):
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (c["batch"], c["block_size"])
    return [(rng.integers(0, c["vocab_size"], shape), rng.integers(0, c["vocab_size"], shape)) for _ in range(N_BATCHES)]


# ---- memory -----------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def reset_peak() -> tuple[int, bool]:
    """(current RSS in KiB, whether the peak could be reset)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return _status_kib("VmRSS"), True
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False


def read_peak(resettable: bool) -> int:
    return _status_kib("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def timed_steps(step, n_warm: int, n: int) -> dict:
    """Run step() n_warm + n times; step returns its part times; medians of the last n."""
    parts = []
    for i in range(n_warm + n):
        parts.append(step(i))
    parts = parts[n_warm:]
    out = {k: statistics.median(p[k] for p in parts) for k in parts[0] if k != "loss"}
    out["step_s_all"] = [p["step"] for p in parts]
    return out


# ---- tinylm worker ----------------------------------------------------------------------------
def worker_tinylm(c: dict, args) -> dict:
    import numpy as np

    from kernels._threads import set_num_threads

    set_num_threads(args.threads)
    from tinylm.models import GPT, GPTConfig
    from tinylm.optim import AdamW

    # warm-up on a tiny model: Numba loads its cached kernels (or compiles) outside the measurement
    tiny = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    topt = AdamW(tiny.param_groups(WD), lr=LR)
    _, l0 = tiny(np.zeros((2, 8), np.int64), np.ones((2, 8), np.int64), return_logits=False)
    l0.backward()
    topt.clip_grad_norm(CLIP)
    topt.step()
    del tiny, topt, l0

    base, resettable = reset_peak()
    if c["model"] == "llama":
        from tinylm.models import Llama, LlamaConfig

        model = Llama(LlamaConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_kv_head=c["n_kv_head"],
                                  n_embd=c["n_embd"], block_size=c["block_size"], vocab_size=c["vocab_size"],
                                  ffn_hidden=c["ffn_hidden"]), seed=0)
    else:
        model = GPT(GPTConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                              block_size=c["block_size"], vocab_size=c["vocab_size"]), seed=0)
    if args.init_dir:
        model.save_hf(args.init_dir)  # the torch worker starts from these weights
    res = {"params": model.num_params(), "flops_per_token": model.flops_per_token(c["block_size"])}
    if args.mode == "gen":
        return res | gen_tinylm(model, c, args) | {"base_kib": base, "peak_kib": read_peak(resettable), "resettable": resettable}
    fmt = getattr(args, "dtype", "fp32")
    if fmt == "fp32":
        opt = AdamW(model.param_groups(WD), lr=LR, betas=BETAS)
        store, scaler, activations = None, None, contextlib.nullcontext
    else:  # [amp #13] the Trainer's path: fp32 masters and moments, 16-bit values, fp16 loss scaling
        from types import SimpleNamespace

        from tinylm.amp import train as amp_train
        from tinylm.optim import ParamStore

        store = ParamStore.for_model(model, WD)
        policy, scaler = amp_train.setup(store, SimpleNamespace(dtype=fmt, master_weights=True, seed=0))
        opt = AdamW(store, lr=LR, betas=BETAS)
        activations = lambda: amp_train.activations(policy)  # noqa: E731 (the forward as the Trainer runs it)
        res["bytes_held"] = policy.bytes_held(store)
        res["bytes_zero"] = policy.bytes_per_param()
    data = batches(c)
    losses = []

    def step(i):
        x, y = data[i % N_BATCHES]
        t0 = time.perf_counter()
        with activations():
            _, loss = model(x, y, return_logits=False)  # as the Trainer: the fused LM head + loss
        lv = loss.item()
        t1 = time.perf_counter()
        (loss if scaler is None else loss * scaler.scale).backward()
        t2 = time.perf_counter()
        if store is None:
            opt.clip_grad_norm(CLIP)
            apply = True
        else:
            apply = amp_train.grads_ready(store, scaler, CLIP)[1]
        t3 = time.perf_counter()
        if apply:
            opt.step()
        opt.zero_grad()
        t4 = time.perf_counter()
        losses.append(lv)
        return {"forward": t1 - t0, "backward": t2 - t1, "clip": t3 - t2, "optimizer": t4 - t3, "step": t4 - t0}

    res |= timed_steps(step, args.warmup, args.steps)
    res |= {"losses": losses, "base_kib": base, "peak_kib": read_peak(resettable), "resettable": resettable}
    if args.profile:
        res["profile"] = profile_tinylm(model, opt, data)
    return res


def profile_tinylm(model, opt, data, n: int = 2) -> dict:
    """Seconds per step in each Function's forward/backward (wrapped timers), plus the rest."""
    from tinylm import functional, ops  # noqa: F401  (registers every Function subclass)
    from tinylm.tensor import Function

    acc: dict[str, float] = {}

    def all_subclasses(cls):
        for s in cls.__subclasses__():
            yield s
            yield from all_subclasses(s)

    def wrap(cls, meth):
        orig = cls.__dict__[meth]

        def timed(self, *a, **k):
            if meth == "forward":
                key = cls.__name__
                if cls.__name__ == "Linear":  # block linears vs the LM head, by weight shape
                    key += " " + "x".join(map(str, a[1].shape))
                self._bench_key = key
            t = time.perf_counter()
            r = orig(self, *a, **k)
            key = f"{getattr(self, '_bench_key', cls.__name__)} {meth}"
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t
            return r

        setattr(cls, meth, timed)
        return orig

    saved = []
    for cls in set(all_subclasses(Function)):
        for meth in ("forward", "backward"):
            if meth in cls.__dict__:
                saved.append((cls, meth, wrap(cls, meth)))
    phase = {"forward (all)": 0.0, "backward (all)": 0.0, "clip + AdamW": 0.0}
    try:
        for i in range(n):
            x, y = data[i % len(data)]
            t0 = time.perf_counter()
            _, loss = model(x, y, return_logits=False)
            loss.item()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.clip_grad_norm(CLIP)
            opt.step()
            opt.zero_grad()
            t3 = time.perf_counter()
            phase["forward (all)"] += t1 - t0
            phase["backward (all)"] += t2 - t1
            phase["clip + AdamW"] += t3 - t2
    finally:
        for cls, meth, orig in saved:
            setattr(cls, meth, orig)
    return {"ops": {k: v / n for k, v in acc.items()}, "phases": {k: v / n for k, v in phase.items()}}


def gen_tinylm(model, c, args) -> dict:
    import numpy as np

    prompt = np.random.default_rng(1).integers(0, c["vocab_size"], (args.gen_batch, PROMPT_LEN))
    for _ in model.generate_iter(prompt, 4, temperature=0.0):  # warm-up
        pass
    t = time.perf_counter()
    steps = list(model.generate_iter(prompt, args.gen_tokens, temperature=0.0))
    dt = time.perf_counter() - t
    toks = [int(t_[0]) for t_ in steps]  # row 0's tokens (the comparison with PyTorch)
    return {"gen_s": dt, "gen_tokens_per_s": len(steps) * args.gen_batch / dt, "tokens": toks,
            "batch": args.gen_batch}


# ---- PyTorch worker ---------------------------------------------------------------------------
def torch_model(c: dict, init_dir: str):
    """nanoGPT-style GPT-2 in PyTorch, weights read from tinylm's save_hf output (Conv1D (in, out)
    layout, transposed into nn.Linear's (out, in))."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as TF
    from safetensors import safe_open

    C, nh = c["n_embd"], c["n_head"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def qkv(self, x):  # (B, T, C) -> 3 x (B, NH, T, hs)
            B, T, _ = x.shape
            return [a.view(B, T, nh, C // nh).transpose(1, 2) for a in self.c_attn(self.ln_1(x)).split(C, dim=2)]

        def finish(self, x, y):  # y (B, NH, T, hs)
            B, _, T, _ = y.shape
            x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
            return x + self.mlp_proj(TF.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

        def forward(self, x):
            q, k, v = self.qkv(x)
            return self.finish(x, TF.scaled_dot_product_attention(q, k, v, is_causal=True))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(c["vocab_size"], C), nn.Embedding(c["block_size"], C)
            self.h = nn.ModuleList([Block() for _ in range(c["n_layer"])])
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, targets=None):
            T = idx.shape[1]
            x = self.wte(idx) + self.wpe(torch.arange(T))
            for b in self.h:
                x = b(x)
            logits = self.ln_f(x) @ self.wte.weight.T  # tied head
            loss = None if targets is None else TF.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
            return logits, loss

        @torch.no_grad()
        def forward_cached(self, idx, cache, start):  # idx (1, Tn) -> last logits (1, V)
            Tn = idx.shape[1]
            x = self.wte(idx) + self.wpe(torch.arange(start, start + Tn))
            for b, (K, V) in zip(self.h, cache):
                q, k, v = b.qkv(x)
                K[:, :, start : start + Tn], V[:, :, start : start + Tn] = k, v
                # prefill starts at 0 (causal over itself); a single new token sees everything
                y = TF.scaled_dot_product_attention(q, K[:, :, : start + Tn], V[:, :, : start + Tn], is_causal=Tn > 1)
                x = b.finish(x, y)
            return self.ln_f(x[:, -1]) @ self.wte.weight.T

    m = GPT()
    names = {"attn.c_attn": "c_attn", "attn.c_proj": "attn_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_proj"}
    params = dict(m.named_parameters())
    with safe_open(os.path.join(init_dir, "model.safetensors"), "np") as f, torch.no_grad():
        for key in f.keys():  # one tensor at a time: no second copy of the whole model
            ours = key
            for a, b in names.items():
                ours = ours.replace(a, b)
            a = f.get_tensor(key)
            is_linear = ours.endswith(".weight") and any(v in ours for v in names.values())
            params[ours].copy_(torch.from_numpy(a.T.copy() if is_linear else a))
    return m


def torch_llama(c: dict, init_dir: str):
    """Llama in PyTorch eager (SDPA with enable_gqa), with Hugging Face's parameter names, so the
    weights tinylm's save_hf wrote copy in by name (both keep nn.Linear's (out, in) layout)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as TF
    from safetensors import safe_open

    C, nh, nkv = c["n_embd"], c["n_head"], c["n_kv_head"]
    hs, Fh, T = C // nh, c["ffn_hidden"], c["block_size"]
    inv = 10000.0 ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1).float()  # (T, hs): Hugging Face's half-split layout
    sin = torch.cat([ang.sin(), ang.sin()], -1).float()

    def rope(x, start):  # x (B, H, Tn, hs)
        Tn = x.shape[2]
        cs, sn = cos[start:start + Tn], sin[start:start + Tn]
        x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
        return x * cs + torch.cat([-x2, x1], -1) * sn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(C, nh * hs, bias=False), nn.Linear(C, nkv * hs, bias=False)
            self.v_proj, self.o_proj = nn.Linear(C, nkv * hs, bias=False), nn.Linear(nh * hs, C, bias=False)

        def forward(self, x, cache=None, start=0):
            B, Tn, _ = x.shape
            q = rope(self.q_proj(x).view(B, Tn, nh, hs).transpose(1, 2), start)
            k = rope(self.k_proj(x).view(B, Tn, nkv, hs).transpose(1, 2), start)
            v = self.v_proj(x).view(B, Tn, nkv, hs).transpose(1, 2)
            if cache is not None:
                K, V = cache
                K[:, :, start:start + Tn], V[:, :, start:start + Tn] = k, v
                k, v = K[:, :, :start + Tn], V[:, :, :start + Tn]
            y = TF.scaled_dot_product_attention(q, k, v, is_causal=Tn > 1, enable_gqa=True)
            return self.o_proj(y.transpose(1, 2).reshape(B, Tn, C))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(C, Fh, bias=False), nn.Linear(C, Fh, bias=False)
            self.down_proj = nn.Linear(Fh, C, bias=False)

        def forward(self, x):
            return self.down_proj(TF.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(C, eps=1e-6), nn.RMSNorm(C, eps=1e-6)
            self.self_attn, self.mlp = Attn(), MLP()

        def forward(self, x, cache=None, start=0):
            x = x + self.self_attn(self.input_layernorm(x), cache, start)
            return x + self.mlp(self.post_attention_layernorm(x))

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(c["vocab_size"], C)
            self.layers = nn.ModuleList([Layer() for _ in range(c["n_layer"])])
            self.norm = nn.RMSNorm(C, eps=1e-6)

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()
            self.lm_head = nn.Linear(C, c["vocab_size"], bias=False)

        def forward(self, idx, targets=None):
            x = self.model.embed_tokens(idx)
            for layer in self.model.layers:
                x = layer(x)
            logits = self.lm_head(self.model.norm(x))
            loss = None if targets is None else TF.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
            return logits, loss

        @torch.no_grad()
        def forward_cached(self, idx, cache, start):  # idx (1, Tn) -> last logits (1, V)
            x = self.model.embed_tokens(idx)
            for layer, kv in zip(self.model.layers, cache):
                x = layer(x, kv, start)
            return self.lm_head(self.model.norm(x[:, -1]))

    m = Llama()
    params = dict(m.named_parameters())
    with safe_open(os.path.join(init_dir, "model.safetensors"), "np") as f, torch.no_grad():
        for key in f.keys():
            params[key].copy_(torch.from_numpy(f.get_tensor(key)))
    return m


def worker_torch(c: dict, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    base_c = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, batch=2)
    with tempfile.TemporaryDirectory() as d:  # warm-up on a tiny model, as the tinylm worker
        _tiny_init(base_c, d)
        tiny = torch_model(base_c, d)
        o = torch.optim.AdamW(tiny.parameters(), lr=LR)
        tiny(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))[1].backward()
        torch.nn.utils.clip_grad_norm_(tiny.parameters(), CLIP)
        o.step()
        del tiny, o

    base, resettable = reset_peak()
    model = torch_llama(c, args.init_dir) if c["model"] == "llama" else torch_model(c, args.init_dir)
    res = {"params": sum(p.numel() for p in model.parameters())}
    if args.mode == "gen":
        return res | gen_torch(model, c, args) | {"base_kib": base, "peak_kib": read_peak(resettable), "resettable": resettable}
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and n != "wpe.weight"]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and n != "wpe.weight")]
    if c["model"] == "llama":  # as tinylm's Llama.param_groups: every matrix decays
        decay = [p for p in model.parameters() if p.dim() == 2]
        no_decay = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=1e-8, fused=False)  # foreach: PyTorch's default
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches(c)]
    losses = []

    def step(i):
        x, y = data[i % N_BATCHES]
        t0 = time.perf_counter()
        _, loss = model(x, y)
        lv = loss.item()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        losses.append(lv)
        return {"forward": t1 - t0, "backward": t2 - t1, "clip": t3 - t2, "optimizer": t4 - t3, "step": t4 - t0}

    res |= timed_steps(step, args.warmup, args.steps)
    return res | {"losses": losses, "base_kib": base, "peak_kib": read_peak(resettable), "resettable": resettable}


def _tiny_init(c, d):
    """GPT-2-layout weights for the torch warm-up model, without importing tinylm."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    C, V, T = c["n_embd"], c["vocab_size"], c["block_size"]
    w = {"wte.weight": (V, C), "wpe.weight": (T, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(c["n_layer"]):
        for k, s in {"ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
                     "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,), "attn.c_proj.weight": (C, C),
                     "attn.c_proj.bias": (C,), "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
                     "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}.items():
            w[f"h.{i}.{k}"] = s
    save_file({k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in w.items()}, os.path.join(d, "model.safetensors"))


def gen_torch(model, c, args) -> dict:
    import numpy as np
    import torch

    B = args.gen_batch
    prompt = torch.from_numpy(np.random.default_rng(1).integers(0, c["vocab_size"], (B, PROMPT_LEN)))
    hs = c["n_embd"] // c["n_head"]
    nkv = c.get("n_kv_head", c["n_head"])

    def run(n):
        cache = [(torch.zeros(B, nkv, c["block_size"], hs), torch.zeros(B, nkv, c["block_size"], hs))
                 for _ in range(c["n_layer"])]
        logits = model.forward_cached(prompt, cache, 0)
        pos, out = PROMPT_LEN, []
        for _ in range(n):
            nxt = logits.argmax(-1)  # greedy, as tinylm's temperature=0
            out.append(int(nxt[0]))
            logits = model.forward_cached(nxt[:, None], cache, pos)
            pos += 1
        return out

    run(4)
    t = time.perf_counter()
    toks = run(args.gen_tokens)
    dt = time.perf_counter() - t
    return {"gen_s": dt, "gen_tokens_per_s": len(toks) * B / dt, "tokens": toks, "batch": B}


# ---- parent: run the workers, print the table -------------------------------------------------
BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def worker_ceiling(args) -> dict:
    """float32 GEMM 4096^3 through NumPy on OpenBLAS's own pool: the machine's ceiling here."""
    import numpy as np

    sys.path.insert(0, ROOT)
    from kernels._blas import blas_info, set_blas_threads

    set_blas_threads(args.threads)
    n = 4096
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(3))
    out = {"gflops": 2 * n ** 3 / best / 1e9, **blas_info()}
    try:  # PyTorch's own GEMM on the same matrices (MKL here), when PyTorch is installed
        import torch
    except ImportError:
        return out
    torch.set_num_threads(args.threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ta @ tb
    out["torch_gflops"] = 2 * n ** 3 / min(_timed(lambda: ta @ tb) for _ in range(3)) / 1e9
    out["torch_blas"] = "MKL" if torch.backends.mkl.is_available() else "not MKL"
    return out


def ceiling_line(c: dict) -> str:
    line = f"OpenBLAS {c['corename'] or '?'}: float32 GEMM ceiling (4096^3, 2 threads) {c['gflops']:,.0f} GFLOP/s"
    if "torch_gflops" in c:  # what bounds the tinylm/PyTorch ratio of a step made of GEMMs
        line += (f"; PyTorch ({c['torch_blas']}) on the same matrices {c['torch_gflops']:,.0f} GFLOP/s: "
                 f"OpenBLAS/PyTorch {c['gflops'] / c['torch_gflops']:.2f}")
    return line


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_worker(framework: str, cfg_name: str, mode: str, args, init_dir: str, profile: bool = False) -> dict:
    env = dict(os.environ)
    if getattr(args, "blas_mode", "as-is") == "unset":
        for v in BLAS_VARS:
            env.pop(v, None)
    if framework == "tinylm_general":  # tinylm without its fused one-token step (tinylm/models/decode.py)
        framework, env["TINYLM_FAST_DECODE"] = "tinylm", "0"
    n = str(args.threads)
    env.update(TINYLM_NUM_THREADS=n, NUMBA_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--configs", cfg_name, "--mode", mode,
           "--steps", str(args.steps_for(cfg_name)), "--warmup", str(args.warmup_for(cfg_name)),
           "--threads", n, "--gen-tokens", str(args.gen_tokens), "--init-dir", init_dir,
           "--gen-batch", str(getattr(args, "gen_batch_run", 1))]
    if profile:
        cmd.append("--profile")
    if getattr(args, "dtype", "fp32") != "fp32":
        cmd += ["--dtype", args.dtype]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout)[-3000:]
        raise RuntimeError(f"{framework} worker for {cfg_name}/{mode} failed (exit {p.returncode}):\n{tail}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = time.perf_counter() - t
    return res


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f}"


def print_train_table(rows: list[tuple[str, dict, dict | None]], mode: str = "as-is", ceiling: dict | None = None) -> None:
    what = {"as-is": "the environment as it is", "unset": "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset"}[mode]
    print(f"\n## Training step (forward, backward, clip, AdamW), fp32, median of the measured steps: {what}\n")
    if ceiling:
        print(ceiling_line(ceiling) + "\n")
    print("| config | params | framework | ms/step | tokens/s | GFLOP/s | share of ceiling | peak RSS MiB | growth MiB | first loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, ours, theirs in rows:
        c = config_of(name)
        tok = c["batch"] * c["block_size"]
        for fw, r in (("tinylm", ours), ("PyTorch", theirs)):
            if r is None:
                continue
            tps = tok / r["step"]
            gf = flops_per_token(c) * tps / 1e9
            share = f"{100 * gf / ceiling['gflops']:.0f}%" if ceiling else ""
            print(f"| {name} | {r['params'] / 1e6:.1f}M | {fw} | {r['step'] * 1e3:,.0f} | {tps:,.0f} | "
                  f"{gf:,.1f} | {share} | {mib(r['peak_kib'])} | {mib(r['peak_kib'] - r['base_kib'])} | "
                  f"{r['losses'][0]:.4f} |")
    if any(t is not None for _, _, t in rows):
        print("\n| config | tokens/s ratio tinylm/PyTorch | peak RSS ratio | growth ratio | first-loss difference |")
        print("|---|---|---|---|---|")
        for name, ours, theirs in rows:
            if theirs is None:
                continue
            g_ours, g_theirs = ours["peak_kib"] - ours["base_kib"], theirs["peak_kib"] - theirs["base_kib"]
            print(f"| {name} | {theirs['step'] / ours['step']:.2f} | {ours['peak_kib'] / theirs['peak_kib']:.2f} | "
                  f"{g_ours / max(g_theirs, 1):.2f} | {abs(ours['losses'][0] - theirs['losses'][0]):.1e} |")
    if not all(r["resettable"] for _, o, t in rows for r in (o, t) if r is not None):
        print("\n(peak memory from ru_maxrss: /proc/self/clear_refs was not writable, so it includes the warm-up)")


def print_parts(name: str, ours: dict, theirs: dict | None) -> None:
    print(f"\n## Where a step goes, config {name} (ms, medians per part)\n")
    print("| part | tinylm | PyTorch | ratio tinylm/PyTorch |")
    print("|---|---|---|---|")
    for part in ("forward", "backward", "clip", "optimizer", "step"):
        t = theirs[part] * 1e3 if theirs else None
        print(f"| {part} | {ours[part] * 1e3:,.1f} | {'' if t is None else f'{t:,.1f}'} | "
              f"{'' if t is None else f'{ours[part] * 1e3 / t:.2f}'} |")


def print_profile(name: str, prof: dict) -> None:
    ops, phases = prof["ops"], prof["phases"]
    print(f"\n## tinylm per-op time, config {name} (ms per step, timers around each Function; 2 steps)\n")
    print("| op | ms | share of step |")
    print("|---|---|---|")
    total = sum(phases.values())
    for k, v in sorted(ops.items(), key=lambda kv: -kv[1]):
        if v * 1e3 >= 0.05:
            print(f"| {k} | {v * 1e3:,.1f} | {100 * v / total:.1f}% |")
    fwd_ops = sum(v for k, v in ops.items() if k.endswith(" forward"))
    bwd_ops = sum(v for k, v in ops.items() if k.endswith(" backward"))
    print(f"| (forward outside ops: Python, Tensor glue) | {(phases['forward (all)'] - fwd_ops) * 1e3:,.1f} | "
          f"{100 * (phases['forward (all)'] - fwd_ops) / total:.1f}% |")
    print(f"| (backward outside ops: engine, accumulation) | {(phases['backward (all)'] - bwd_ops) * 1e3:,.1f} | "
          f"{100 * (phases['backward (all)'] - bwd_ops) / total:.1f}% |")
    print(f"| clip + AdamW | {phases['clip + AdamW'] * 1e3:,.1f} | {100 * phases['clip + AdamW'] / total:.1f}% |")
    print(f"| step (timed, with timers' overhead) | {total * 1e3:,.1f} | 100% |")


def measure(args, names, llamas, have_torch, mode) -> dict:
    """Every measurement, in one BLAS environment mode; prints its tables; returns the results."""
    print(f"\n# BLAS environment: {mode}", flush=True)
    ceiling = run_worker("ceiling", "M", "train", args, "")
    print(ceiling_line(ceiling), flush=True)
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="tinylm-bench-") as tmp:
        for name in ([] if args.only_gen else names):
            init_dir = os.path.join(tmp, name)
            runs = {"tinylm": [], "torch": []}
            for r in range(args.rounds):  # alternate the two, so a burst of load hits both alike
                print(f"{name} round {r + 1}/{args.rounds}: tinylm ...", end=" ", flush=True)
                runs["tinylm"].append(run_worker("tinylm", name, "train", args, init_dir,
                                                 name == args.profile_config.upper() and not args.no_profile and r == 0))
                print(f"{runs['tinylm'][-1]['step'] * 1e3:,.0f} ms/step", end="", flush=True)
                if have_torch:
                    print("; PyTorch ...", end=" ", flush=True)
                    runs["torch"].append(run_worker("torch", name, "train", args, init_dir))
                    print(f"{runs['torch'][-1]['step'] * 1e3:,.0f} ms/step", end="", flush=True)
                print(flush=True)
            # each framework's least-disturbed round (lowest median step time)
            ours = min(runs["tinylm"], key=lambda r: r["step"])
            if "profile" not in ours and "profile" in runs["tinylm"][0]:
                ours["profile"] = runs["tinylm"][0]["profile"]
            theirs = min(runs["torch"], key=lambda r: r["step"]) if runs["torch"] else None
            rows.append((name, ours, theirs))
            results[name] = {"tinylm": ours, "torch": theirs, "rounds": runs}
        gen_names = ["M"] + (["llama-M"] if "M" in llamas else [])
        gen_rounds = args.rounds if args.only_gen else 1
        batches_gen = [1] + ([args.gen_batch] if args.gen_batch > 1 else [])
        for gname in ([] if args.no_gen else gen_names):
            init_dir = os.path.join(tmp, f"{gname}-gen")
            fws = ("tinylm", "torch") if have_torch else ("tinylm",)
            runs = {(fw, b): [] for fw in fws for b in batches_gen}
            if args.gen_general:
                runs[("tinylm_general", 1)] = []
            for r in range(gen_rounds):  # alternate frameworks and batch sizes, keep each one's fastest
                for b in batches_gen:
                    args.gen_batch_run = b
                    for fw in fws + (("tinylm_general",) if args.gen_general and b == 1 else ()):
                        print(f"generation at {gname} batch {b} round {r + 1}/{gen_rounds}: {fw} ...", end=" ", flush=True)
                        runs[(fw, b)].append(run_worker(fw, gname, "gen", args, init_dir))
                        print(f"{runs[(fw, b)][-1]['gen_tokens_per_s']:,.1f} tokens/s", flush=True)
            args.gen_batch_run = 1
            best = {k: (max(v, key=lambda g: g["gen_tokens_per_s"]) if v else None) for k, v in runs.items()}
            results[f"generation_{gname}"] = {"tinylm": best[("tinylm", 1)], "torch": best.get(("torch", 1)),
                                              "batched": {f"{fw}_b{b}": best[(fw, b)] for fw, b in runs},
                                              "rounds": {f"{fw}_b{b}": v for (fw, b), v in runs.items()}}

    if rows:
        print_train_table(rows, mode, ceiling)
    for name, ours, theirs in rows:
        if name in ("M", "llama-M", args.profile_config.upper()) or len(rows) == 1:
            print_parts(name, ours, theirs)
        if "profile" in ours:
            print_profile(name, ours["profile"])
    for gname in ([] if args.no_gen else gen_names):
        g_ours, g_theirs = results[f"generation_{gname}"]["tinylm"], results[f"generation_{gname}"]["torch"]
        print(f"\n## Generation, config {gname}, batch 1, KV cache, greedy, {PROMPT_LEN}-token prompt + "
              f"{args.gen_tokens} new\n")
        print("| framework | tokens/s | ms/token |")
        print("|---|---|---|")
        g_general = results[f"generation_{gname}"]["batched"].get("tinylm_general_b1")
        for fw, g in (("tinylm", g_ours), ("tinylm, general path (TINYLM_FAST_DECODE=0)", g_general),
                      ("PyTorch", g_theirs)):
            if g is not None:
                print(f"| {fw} | {g['gen_tokens_per_s']:,.1f} | {1e3 / g['gen_tokens_per_s']:.2f} |")
        if g_theirs is not None:
            same = next((i for i, (a, b) in enumerate(zip(g_ours["tokens"], g_theirs["tokens"])) if a != b), len(g_ours["tokens"]))
            print(f"\nratio tinylm/PyTorch: {g_ours['gen_tokens_per_s'] / g_theirs['gen_tokens_per_s']:.2f}; "
                  f"greedy tokens identical for the first {same} of {len(g_ours['tokens'])}")
        bat = results[f"generation_{gname}"]["batched"]
        B = args.gen_batch
        if B > 1 and bat.get(f"tinylm_b{B}") is not None:
            print(f"\n## Generation, config {gname}, batch {B} (one cache) vs batch 1, greedy, {PROMPT_LEN}-token "
                  f"prompts + {args.gen_tokens} new; tokens/s counts all rows\n")
            print(f"| framework | batch 1 tokens/s | batch {B} tokens/s | batch {B} ms/step | x batch 1 |")
            print("|---|---|---|---|---|")
            for fw, name in (("tinylm", "tinylm"), ("torch", "PyTorch")):
                one, many = bat.get(f"{fw}_b1"), bat.get(f"{fw}_b{B}")
                if one is not None and many is not None:
                    print(f"| {name} | {one['gen_tokens_per_s']:,.1f} | {many['gen_tokens_per_s']:,.1f} | "
                          f"{1e3 * B / many['gen_tokens_per_s']:.2f} | {many['gen_tokens_per_s'] / one['gen_tokens_per_s']:.2f} |")
            if bat.get(f"torch_b{B}") is not None:
                print(f"\nbatch {B} ratio tinylm/PyTorch: "
                      f"{bat[f'tinylm_b{B}']['gen_tokens_per_s'] / bat[f'torch_b{B}']['gen_tokens_per_s']:.2f}; "
                      f"row 0's greedy tokens identical for the first "
                      f"{next((i for i, (a, b) in enumerate(zip(bat[f'tinylm_b{B}']['tokens'], bat[f'torch_b{B}']['tokens'])) if a != b), len(bat[f'tinylm_b{B}']['tokens']))}"
                      f" of {len(bat[f'tinylm_b{B}']['tokens'])}")
    results["ceiling"] = ceiling
    return results


def measure_dtypes(args, names, dtypes) -> dict:
    """[amp #13] tinylm's step in each format against its own fp32 step, the rounds alternating
    over the formats: median step time, peak memory growth, and bytes per parameter as the
    store holds them against the ZeRO paper's mixed-precision Adam accounting."""
    batch = f"; batch {args.batch} for every config" if args.batch else ""
    print(f"\n# Formats {','.join(dtypes)} (tinylm only; BLAS environment: {args.blas_mode}{batch})", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="tinylm-bench-") as tmp:
        for name in names:
            runs = {d: [] for d in dtypes}
            for r in range(args.rounds):
                for d in dtypes:
                    args.dtype = d
                    print(f"{name} {d} round {r + 1}/{args.rounds} ...", end=" ", flush=True)
                    runs[d].append(run_worker("tinylm", name, "train", args, os.path.join(tmp, f"{name}-{d}")))
                    print(f"{runs[d][-1]['step'] * 1e3:,.0f} ms/step", flush=True)
            args.dtype = "fp32"
            results[name] = {d: min(runs[d], key=lambda x: x["step"]) for d in dtypes}
            results[name]["peak_growth_mib"] = {d: [(x["peak_kib"] - x["base_kib"]) / 1024 for x in runs[d]]
                                                for d in dtypes}
    print("\n| config | dtype | ms/step | vs fp32 | peak growth MiB | vs fp32 | bytes/param held (w + master + "
          "moments + grads) | ZeRO paper |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        ref = results[name].get("fp32")
        for d in dtypes:
            x = results[name][d]
            growth = (x["peak_kib"] - x["base_kib"]) / 1024
            vs_t = f"{x['step'] / ref['step']:.2f}" if ref else "-"
            vs_m = f"{growth / ((ref['peak_kib'] - ref['base_kib']) / 1024):.2f}" if ref else "-"
            held = x.get("bytes_held", {"weights": 4, "master": 0, "moments": 8, "gradients": 4, "total": 16})
            zero = x.get("bytes_zero", {"total": 16})
            print(f"| {name} | {d} | {x['step'] * 1e3:,.0f} | {vs_t} | {growth:,.0f} | {vs_m} | "
                  f"{held['weights']:.0f} + {held['master']:.0f} + {held['moments']:.0f} + {held['gradients']:.0f} = "
                  f"{held['total']:.0f} | {zero['total']} |")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="tinylm vs PyTorch: training step and KV-cache generation")
    ap.add_argument("--configs", default="S,M,L", help="GPT configs, comma-separated from S,M,L (default: all)")
    ap.add_argument("--llama-configs", default="M", help="Llama configs from S,M,L (default M; '' for none)")
    ap.add_argument("--steps", type=int, default=None, help=f"measured steps (default per config: {DEFAULT_STEPS})")
    ap.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default 2; 1 for L)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run each config's pair of workers this many times, alternating; report each "
                         "framework's fastest round (for a machine whose load varies)")
    ap.add_argument("--gen-tokens", type=int, default=200)
    ap.add_argument("--no-gen", action="store_true", help="skip the generation benchmark")
    ap.add_argument("--only-gen", action="store_true",
                    help="only the generation benchmark (batch 1 and --gen-batch, --rounds alternating rounds)")
    ap.add_argument("--gen-general", action="store_true",
                    help="also time tinylm's batch-1 generation without its fused one-token step (the general "
                         "block code, TINYLM_FAST_DECODE=0): the before/after of tinylm/models/decode.py")
    ap.add_argument("--gen-batch", type=int, default=8,
                    help="also generate this many sequences in one cache, against batch 1 (default 8; 1: batch 1 only)")
    ap.add_argument("--no-torch", action="store_true", help="tinylm only")
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)  # worker flag
    ap.add_argument("--no-profile", action="store_true", help="skip the per-op profile")
    ap.add_argument("--profile-config", default="M", help="config to profile per op (default M)")
    ap.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    ap.add_argument("--blas-env", choices=["as-is", "unset", "both"], default="both",
                    help="run the workers with the environment as it is, with OPENBLAS_CORETYPE and "
                         "OPENBLAS_L2_SIZE removed, or both (default)")
    ap.add_argument("--dtypes", metavar="LIST",
                    help="[amp] instead of the PyTorch comparison: tinylm's step in these formats (e.g. "
                         "fp32,bf16,fp16) against its fp32 step: time, peak memory, bytes per parameter")
    ap.add_argument("--batch", type=int, default=None,
                    help="sequences per step for every config, instead of each config's own (e.g. --dtypes at a "
                         "batch where the activations outweigh the parameter state)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help=argparse.SUPPRESS)  # worker
    ap.add_argument("--worker", choices=["tinylm", "torch", "ceiling"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["train", "gen"], default="train", help=argparse.SUPPRESS)
    ap.add_argument("--init-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.only_gen and args.no_gen:
        ap.error("--only-gen and --no-gen exclude each other")
    if args.gen_batch < 1:
        ap.error("--gen-batch must be >= 1")
    if args.worker == "ceiling":
        print("RESULT " + json.dumps(worker_ceiling(args)), flush=True)
        return 0
    if args.worker:  # one config, named as config_of knows it ("M", "llama-M")
        name = args.configs
        args.steps = args.steps if args.steps is not None else DEFAULT_STEPS[base_name(name)]
        args.warmup = args.warmup if args.warmup is not None else (1 if base_name(name) == "L" else 2)
        fn = worker_tinylm if args.worker == "tinylm" else worker_torch
        c = config_of(name)
        if args.batch:
            c["batch"] = args.batch
        print("RESULT " + json.dumps(fn(c, args)), flush=True)
        return 0
    names = [s.strip().upper() for s in args.configs.split(",") if s.strip()]
    llamas = [s.strip().upper() for s in args.llama_configs.split(",") if s.strip()]
    bad = [n for n in names + llamas if n not in CONFIGS]
    if bad or not (names or llamas):
        ap.error(f"unknown config(s) {bad}; choose from {sorted(CONFIGS)}")
    names += [f"llama-{n}" for n in llamas]
    args.steps_for = lambda n: args.steps if args.steps is not None else DEFAULT_STEPS[base_name(n)]
    args.warmup_for = lambda n: args.warmup if args.warmup is not None else (1 if base_name(n) == "L" else 2)

    have_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    print(f"threads {args.threads}; PyTorch {'found' if have_torch else 'not used'}; "
          f"configs {','.join(names)}; {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    if have_torch:
        import torch  # noqa: PLC0415  (only for its version string)

        print(f"torch {torch.__version__}", flush=True)
    modes = ["as-is", "unset"] if args.blas_env == "both" else [args.blas_env]
    all_results = {}
    dtypes = [d.strip() for d in (args.dtypes or "").split(",") if d.strip()]
    if any(d not in ("fp32", "bf16", "fp16") for d in dtypes):
        ap.error(f"--dtypes {args.dtypes}: formats are fp32, bf16, fp16")
    for mode in modes:
        args.blas_mode = mode
        all_results[mode] = (measure_dtypes(args, names, dtypes) if dtypes
                             else measure(args, names, llamas, have_torch, mode))
    results = all_results if len(modes) > 1 else all_results[modes[0]]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
