"""AdamW with one fused update per parameter group, gradient clipping, the LR schedule.

The optimizer owns one flat buffer per group for the parameters, their gradients and the two
moments; each parameter's ``.data`` and ``.grad`` become views into those buffers. So a step is
one kernel call per group (``kernels/adamw.py``) instead of a Python loop over ~50 arrays, and
the global gradient norm is one reduction per group. The engine accumulates into ``.grad`` in
place, so gradients land in the flat buffer with no copy.

AdamW, per element (Loshchilov & Hutter 2019; torch.optim.AdamW's formulation):
    m = b1 m + (1-b1) g;   v = b2 v + (1-b2) g^2
    p -= lr * (wd * p + (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps))

Leaves out: amsgrad, per-group betas, sparse gradients.
"""
from __future__ import annotations

import math

import numpy as np

import kernels
from tinylm.backend import to_device, xp_of


class AdamW:
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        """``params``: a list of Parameters, or a list of groups ``{"params": [...], "weight_decay": wd}``."""
        if not params:
            raise ValueError("AdamW: no parameters to optimise")
        groups = params if isinstance(params[0], dict) else [{"params": list(params)}]
        self.lr, self.betas, self.eps = float(lr), tuple(betas), float(eps)
        self.step_count = 0
        self.groups = []
        for g in groups:
            ps = [p for p in g["params"]]
            if not ps:
                continue
            xp = xp_of(ps[0].data)
            dtype = ps[0].dtype
            if any(p.dtype != dtype for p in ps):
                raise TypeError("AdamW: all parameters of a group must share one dtype")
            n = sum(p.size for p in ps)
            flat_p = xp.empty(n, dtype=dtype)
            flat_g = xp.zeros(n, dtype=dtype)
            views, gviews, off = [], [], 0
            for p in ps:
                k = p.size
                flat_p[off : off + k] = p.data.reshape(-1)
                p.data = flat_p[off : off + k].reshape(p.shape)
                gv = flat_g[off : off + k].reshape(p.shape)
                p.grad = gv
                views.append(p.data)
                gviews.append(gv)
                off += k
            self.groups.append({
                "params": ps, "p": flat_p, "g": flat_g, "gviews": gviews,
                "m": xp.zeros(n, dtype=dtype), "v": xp.zeros(n, dtype=dtype),
                "weight_decay": float(g.get("weight_decay", weight_decay)),
            })

    def zero_grad(self) -> None:
        for g in self.groups:
            g["g"].fill(0)
            for p, gv in zip(g["params"], g["gviews"]):
                p.grad = gv

    def _sync_grads(self) -> None:
        """Bring every .grad into the flat buffer (someone may have set it to None or replaced it)."""
        for g in self.groups:
            for p, gv in zip(g["params"], g["gviews"]):
                if p.grad is gv:
                    continue
                if p.grad is None:
                    gv.fill(0)
                else:
                    gv[...] = p.grad
                p.grad = gv

    def grad_norm(self) -> float:
        """Global L2 norm of all gradients (float64 accumulation)."""
        self._sync_grads()
        total = 0.0
        for g in self.groups:
            total += float(kernels.get("sumsq", g["g"])(g["g"]))
        return math.sqrt(total)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale all gradients so their global norm is at most ``max_norm``; returns the norm before."""
        norm = self.grad_norm()
        if max_norm > 0 and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for g in self.groups:
                g["g"] *= g["g"].dtype.type(scale)
        return norm

    def step(self, lr: float | None = None) -> None:
        self._sync_grads()
        self.step_count += 1
        lr = self.lr if lr is None else float(lr)
        b1, b2 = self.betas
        for g in self.groups:
            kernels.get("adamw_update", g["p"])(g["p"], g["g"], g["m"], g["v"], lr, b1, b2, self.eps, g["weight_decay"], self.step_count)

    # ---- state for checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"step": np.array([self.step_count], dtype=np.int64)}
        for i, g in enumerate(self.groups):
            out[f"group{i}.m"] = to_device(g["m"], "cpu")
            out[f"group{i}.v"] = to_device(g["v"], "cpu")
        return out

    def load_state_dict(self, state: dict) -> None:
        for i, g in enumerate(self.groups):
            for key in ("m", "v"):
                name = f"group{i}.{key}"
                if name not in state:
                    raise KeyError(f"optimizer state lacks {name!r}")
                a = np.asarray(state[name])
                if a.shape != g[key].shape:
                    raise ValueError(f"optimizer state {name} has shape {a.shape}, expected {g[key].shape}")
                g[key][...] = xp_of(g[key]).asarray(a)
        self.step_count = int(np.asarray(state["step"]).reshape(-1)[0])


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``.

    step counts from 0: lr(0) = max_lr / warmup, lr(warmup - 1) = max_lr, lr(total) = min_lr.
    """
    if warmup > 0 and step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    frac = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * frac))
