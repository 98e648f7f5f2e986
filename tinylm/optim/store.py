"""The flat parameter store: parameters, gradients and optimizer state as flat buffers.

One group per weight-decay setting (GPT-2 practice: matrices decay, biases and norms do not).
Per group, the store keeps one contiguous buffer for the parameters (``p``) and one for their
gradients (``g``); each Parameter's ``.data`` and ``.grad`` become reshaped views of a range of
them, so the engine's in-place accumulation writes straight into ``g`` and an update is one
kernel call per group instead of a Python loop over ~50 arrays. Any other per-element state
(AdamW's moments, later fp32 master weights or a ZeRO shard) is a named buffer of the same
length from ``buffer(name)``, laid out with the same offsets.

    params  [ wte (V*C) | h.0.attn.c_attn.weight (C*3C) | ... ]   group 0 ("decay")
    offsets   0           V*C                             ...
    grads   [ same layout ]                                        views: p.grad
    m, v    [ same layout ]                                        store.buffer("m")

Writing the ranges once, here, is what lets every later user (mixed precision, sharding) agree
on which element is which.

Leaves out: parameters on different devices in one group; groups of mixed dtypes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

import kernels
from tinylm.backend import to_device, xp_of


@dataclass
class Group:
    params: list                    # the Parameters, in buffer order
    names: list                     # their names (from the model), or p0, p1, ...
    offsets: list                   # start of each parameter's range in the flat buffers
    p: object                       # flat parameter buffer (N,)
    g: object                       # flat gradient buffer (N,)
    gviews: list                    # each parameter's view of g (what .grad should be)
    weight_decay: float = 0.0
    buffers: dict = field(default_factory=dict)   # name -> flat (N,) array

    @property
    def size(self) -> int:
        return int(self.p.size)


class ParamStore:
    def __init__(self, params, weight_decay: float = 0.0, names: dict | None = None):
        """``params``: a list of Parameters, or of groups ``{"params": [...], "weight_decay": wd}``
        (e.g. ``model.param_groups(wd)``). ``names``: id(param) -> name, for state dicts."""
        if not params:
            raise ValueError("ParamStore: no parameters")
        groups = params if isinstance(params[0], dict) else [{"params": list(params)}]
        self.groups: list[Group] = []
        seen: set[int] = set()
        for gi, spec in enumerate(groups):
            ps = list(spec["params"])
            if not ps:
                continue
            for p in ps:
                if id(p) in seen:
                    raise ValueError("ParamStore: a parameter appears in two groups")
                seen.add(id(p))
            dtype = ps[0].dtype
            if any(p.dtype != dtype for p in ps):
                raise TypeError("ParamStore: all parameters of a group must share one dtype")
            xp = xp_of(ps[0].data)
            n = sum(p.size for p in ps)
            flat_p, flat_g = xp.empty(n, dtype=dtype), xp.zeros(n, dtype=dtype)
            offsets, gviews, off = [], [], 0
            for p in ps:
                k = p.size
                flat_p[off:off + k] = p.data.reshape(-1)
                p.data = flat_p[off:off + k].reshape(p.shape)
                gv = flat_g[off:off + k].reshape(p.shape)
                p.grad = gv
                offsets.append(off)
                gviews.append(gv)
                off += k
            pnames = [names.get(id(p), f"g{gi}.p{i}") if names else f"g{gi}.p{i}" for i, p in enumerate(ps)]
            self.groups.append(Group(ps, pnames, offsets, flat_p, flat_g, gviews,
                                     float(spec.get("weight_decay", weight_decay))))

    @classmethod
    def for_model(cls, model, weight_decay: float = 0.0, trainable_only: bool = True) -> "ParamStore":
        """A store over ``model.param_groups(weight_decay)`` (or all parameters in one group)."""
        names = {id(p): n for n, p in model.named_parameters()}
        groups = model.param_groups(weight_decay) if hasattr(model, "param_groups") else [
            {"params": model.parameters(), "weight_decay": weight_decay}]
        if trainable_only:
            groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
        return cls(groups, weight_decay, names)

    # ---- sizes ----------------------------------------------------------------------------
    def numel(self) -> int:
        return sum(g.size for g in self.groups)

    def nbytes(self) -> dict[str, int]:
        """Bytes held per kind of buffer: params, grads, and each named buffer."""
        out = {"params": sum(g.p.nbytes for g in self.groups), "grads": sum(g.g.nbytes for g in self.groups)}
        for g in self.groups:
            for name, b in g.buffers.items():
                out[name] = out.get(name, 0) + b.nbytes
        return out

    # ---- buffers --------------------------------------------------------------------------
    def buffer(self, name: str, dtype=None) -> list:
        """The named per-element buffer of each group (zeros when first asked for)."""
        out = []
        for g in self.groups:
            if name not in g.buffers:
                xp = xp_of(g.p)
                g.buffers[name] = xp.zeros(g.size, dtype=g.p.dtype if dtype is None else dtype)
            out.append(g.buffers[name])
        return out

    # ---- gradients ------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for g in self.groups:
            g.g.fill(0)
            for p, gv in zip(g.params, g.gviews):
                p.grad = gv

    def sync_grads(self) -> None:
        """Bring every .grad into the flat buffer (user code may have set it to None or
        replaced it) and point it back at its view."""
        for g in self.groups:
            for p, gv in zip(g.params, g.gviews):
                if p.grad is gv:
                    continue
                if p.grad is None:
                    gv.fill(0)
                else:
                    gv[...] = p.grad
                p.grad = gv

    def grad_norm(self) -> float:
        """Global L2 norm of all gradients (sums of squares accumulated in float64)."""
        self.sync_grads()
        return math.sqrt(sum(float(kernels.get("sumsq", g.g)(g.g)) for g in self.groups))

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale all gradients so their global norm is at most ``max_norm``; returns the norm
        before clipping."""
        norm = self.grad_norm()
        if max_norm > 0 and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for g in self.groups:
                g.g *= g.g.dtype.type(scale)
        return norm

    def state_arrays(self, name: str) -> dict[str, np.ndarray]:
        """A named buffer as ``{"group{i}.{name}": array}`` on the CPU (for checkpoints)."""
        return {f"group{i}.{name}": to_device(g.buffers[name], "cpu") for i, g in enumerate(self.groups)
                if name in g.buffers}
