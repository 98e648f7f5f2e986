"""AdamW over a ParamStore: one fused update per parameter group.

AdamW, per element (Loshchilov & Hutter 2019; torch.optim.AdamW's formulation):
    m = b1 m + (1-b1) g;   v = b2 v + (1-b2) g^2
    p -= lr * (wd * p + (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps))

The moments are the store's buffers "m" and "v" (same layout as the parameters); the update is
``kernels/adamw.py``, one call per group. Gradient norm and clipping are the store's (they
belong to the gradients, not to Adam), and are kept here as methods for convenience.

Mixed precision (tinylm/amp/policy.py): the update goes to the store's ``update_targets()``,
the fp32 masters when it has them, and ``store.after_update`` then refreshes the 16-bit working
copy (or rounds bf16 weights stochastically); with fp32 weights both are the plain ``p``.

Leaves out: amsgrad, per-group betas, sparse gradients.
"""
from __future__ import annotations

import numpy as np

import kernels
from tinylm.backend import xp_of
from tinylm.optim.store import ParamStore


class AdamW:
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        """``params``: a ParamStore, a list of Parameters, or a list of groups
        ``{"params": [...], "weight_decay": wd}`` (a store is then built over them)."""
        self.store = params if isinstance(params, ParamStore) else ParamStore(params, weight_decay)
        self.lr, self.betas, self.eps = float(lr), tuple(betas), float(eps)
        self.step_count = 0
        self.m = self.store.buffer("m")
        self.v = self.store.buffer("v")

    # the gradient side lives in the store
    def zero_grad(self) -> None:
        self.store.zero_grad()

    def grad_norm(self) -> float:
        return self.store.grad_norm()

    def clip_grad_norm(self, max_norm: float) -> float:
        return self.store.clip_grad_norm(max_norm)

    def step(self, lr: float | None = None) -> None:
        self.store.sync_grads()
        self.step_count += 1
        lr = self.lr if lr is None else float(lr)
        b1, b2 = self.betas
        st = self.store
        targets = st.update_targets() if hasattr(st, "update_targets") else [g.p for g in st.groups]  # p, or fp32 masters
        for g, p, m, v in zip(self.store.groups, targets, self.m, self.v):
            kernels.get("adamw_update", p)(p, g.g, m, v, lr, b1, b2, self.eps, g.weight_decay, self.step_count)
        if hasattr(st, "after_update"):
            st.after_update(self.step_count)

    # ---- state for checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"step": np.array([self.step_count], dtype=np.int64)}
        out.update(self.store.state_arrays("m"))
        out.update(self.store.state_arrays("v"))
        if getattr(self.store, "master", False):  # a 16-bit run: the fp32 masters, so a resume is exact
            out.update(self.store.state_arrays("master"))
        return out

    def load_state_dict(self, state: dict) -> None:
        keys = ("m", "v", "master") if getattr(self.store, "master", False) else ("m", "v")
        for i, g in enumerate(self.store.groups):
            for key in keys:
                name = f"group{i}.{key}"
                if name not in state:
                    raise KeyError(f"optimizer state lacks {name!r}")
                a = np.asarray(state[name])
                buf = g.buffers[key]
                if a.shape != buf.shape:
                    raise ValueError(f"optimizer state {name} has shape {a.shape}, expected {buf.shape}")
                buf[...] = xp_of(buf).asarray(a)
        if "step" not in state:
            raise KeyError("optimizer state lacks 'step'")
        self.step_count = int(np.asarray(state["step"]).reshape(-1)[0])
        if hasattr(self.store, "refresh"):
            self.store.refresh()  # the working copy from the restored masters
