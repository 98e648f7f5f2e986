"""The tiny seeded GPT whose numbers are stored in ``gpt_tiny_v1.safetensors``.

One scenario, computed the same way by ``regenerate.py`` (which writes the file) and by
``tests/test_golden.py`` (which compares against it), in float64 and in float32:

- model: GPT(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32), seed 1234;
- data: one fixed batch of 4 sequences of 8 ids, and targets, from numpy's PCG64 seed 99;
- step 0: logits (4, 8, 32), mean cross-entropy, and the gradient of every parameter;
- then 10 AdamW steps on the same batch (GPT-2 param groups, weight decay 0.1, betas
  (0.9, 0.95), lr 1e-2 warmed up over 3 steps then cosine to 1e-3, global-norm clipping at 1.0):
  the loss before each step and the gradient norm before clipping.

Changing anything here changes what the golden file means: bump ``VERSION`` (and the file
name) rather than regenerating over a different scenario.
Leaves out: dropout (0 here; its RNG stream is tested in tests/test_train.py), the GPU.
"""
from __future__ import annotations

import numpy as np

from tinylm.models import GPT, GPTConfig
from tinylm.optim import AdamW, cosine_lr

VERSION = 1
FILE = f"gpt_tiny_v{VERSION}.safetensors"
DTYPES = ("float64", "float32")
CONFIG = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, dropout=0.0, bias=True)
MODEL_SEED, DATA_SEED = 1234, 99
B, T, STEPS = 4, 8, 10
LR, MIN_LR, WARMUP, WD, BETAS, CLIP = 1e-2, 1e-3, 3, 0.1, (0.9, 0.95), 1.0


# Tolerances, as a fraction of the largest magnitude in each stored array (so a gradient entry
# that is nearly zero is not held to a relative bound it cannot meet). Measured in one run when
# the file was made: the Numba kernels against the NumPy references (TINYLM_KERNELS=ref) differ
# by at most 5e-16 of that scale in float64 and 1.6e-7 in float32 (float32's own epsilon is
# 1.2e-7; its GELU uses a tanh with absolute error <= 1.2e-7). The bounds below leave ~1e5x
# (float64) and ~100x (float32) of room for summation order, thread counts and BLAS builds,
# and are still far below what a change of the math does (a wrong scale, a dropped term, an
# off-by-one in the mask all move these values by more than 1e-3).
RTOL = {"float64": 1e-10, "float32": 2e-5}


def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(DATA_SEED)
    x = rng.integers(0, CONFIG["vocab_size"], (B, T))
    y = rng.integers(0, CONFIG["vocab_size"], (B, T))
    return x, y


def compute(dtype: str) -> dict[str, np.ndarray]:
    """Every golden value of one dtype, keyed ``<dtype>/<what>``; arrays in the model's dtype
    except the step losses and norms (float64: they are Python floats)."""
    model = GPT(GPTConfig(**CONFIG, dtype=dtype), seed=MODEL_SEED)
    x, y = batch()
    out = {}
    logits, loss = model(x, y)
    loss.backward()
    out["logits"] = logits.data.copy()
    out["loss"] = np.array([loss.item()])
    for name, p in model.named_parameters():
        out[f"grad/{name}"] = p.grad.copy()
    model.zero_grad()

    opt = AdamW(model.param_groups(WD), lr=LR, betas=BETAS)
    losses, norms = [], []
    for step in range(STEPS):
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        norms.append(opt.clip_grad_norm(CLIP))
        opt.step(cosine_lr(step, LR, MIN_LR, WARMUP, STEPS))
    out["train_losses"] = np.array(losses)
    out["grad_norms"] = np.array(norms)
    return {f"{dtype}/{k}": v for k, v in out.items()}


def compute_all() -> dict[str, np.ndarray]:
    res = {}
    for dt in DTYPES:
        res |= compute(dt)
    return res
