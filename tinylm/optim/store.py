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

Mixed precision (``set_format("bf16" | "fp16", master=True)``, tinylm/amp/policy.py): the fp32
buffer becomes the master weights, the named buffer "master"; ``p`` is then a new 16-bit buffer
(uint16 bf16 bits, or float16: 2 bytes a weight) holding the working copy, the masters rounded
to the format, of which the Parameters are views tagged with ``fmt`` (the engine decodes them
where an op computes, tinylm/tensor.py ``autocast``), and ``refresh()`` re-rounds it after each
update. The gradients stay an fp32 buffer (they are reduced, unscaled and clipped in fp32).
Without a master (bf16 only), ``p`` stays float32 holding bf16 values, the only copy, and the
optimizer's fp32 result is rounded back to bf16 stochastically (``after_update``).

Leaves out: parameters on different devices in one group; groups of mixed dtypes.
"""
from __future__ import annotations

import contextlib
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
        self.format, self.master, self.sr_seed = "fp32", False, 0  # set_format changes them

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
                value_dtype = g.buffers["master"].dtype if "master" in g.buffers else g.p.dtype  # not a 16-bit copy's
                g.buffers[name] = xp.zeros(g.size, dtype=value_dtype if dtype is None else dtype)
            out.append(g.buffers[name])
        return out

    # ---- mixed precision (tinylm/amp/policy.py) ----------------------------------------------
    # (kernels._formats imports Numba: imported in the methods that need it, so importing the
    # store stays light)
    def set_format(self, fmt: str, master: bool = True, seed: int = 0) -> None:
        """Hold the weights in ``fmt``: with ``master``, fp32 masters in buffer "master" and the
        working copy in ``p``; without (bf16 only), ``p`` rounded to bf16, updated with
        stochastic rounding from a stream seeded by ``seed`` and the step."""
        if fmt not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"unknown format {fmt!r}: expected fp32, bf16 or fp16")
        if self.format != "fp32":
            raise RuntimeError(f"set_format: the store is in {self.format} already")
        if fmt != "fp32" and any(g.p.dtype != np.float32 for g in self.groups):
            raise TypeError("mixed precision needs float32 parameters")
        if not master and fmt != "bf16":
            raise ValueError("weights without a master copy are for bf16 only (stochastic rounding)")
        self.format, self.master, self.sr_seed = fmt, bool(master and fmt != "fp32"), int(seed)
        if self.master:
            from kernels._formats import from_f32  # noqa: PLC0415

            for g in self.groups:
                # the fp32 buffer becomes the masters; the working copy is a new 16-bit buffer
                # (2 bytes a weight) of which the parameters' .data are views, tagged with fmt
                g.buffers["master"] = g.p
                g.p = from_f32(g.p, fmt)
                self._point_params(g, g.p, fmt)
        self.refresh()

    def _point_params(self, g, flat, fmt) -> None:
        for p, off in zip(g.params, g.offsets):
            p.data = flat[off:off + p.size].reshape(p.shape)
            p.fmt = fmt

    def refresh(self) -> None:
        """The working copy ``p`` from the masters (round to nearest even); without masters,
        ``p`` rounded to the format in place (a no-op on values already in it)."""
        if self.format == "fp32":
            return
        from kernels._formats import f32_to_bf16, f32_to_fp16, round_to_format  # noqa: PLC0415

        for g in self.groups:
            if not self.master:
                round_to_format(g.p, self.format, out=g.p)
            else:  # round to nearest even (fp16: overflow -> inf), into the 16-bit buffer
                (f32_to_bf16 if self.format == "bf16" else f32_to_fp16)(g.buffers["master"], out=g.p)

    def update_targets(self) -> list:
        """The fp32 arrays an optimizer updates, per group: the masters, or ``p``."""
        return [g.buffers["master"] if self.master else g.p for g in self.groups]

    def after_update(self, step: int) -> None:
        """After an optimizer step: refresh the working copy, or (no master) round the fp32
        result back to bf16 stochastically, one seed per (run seed, step, group)."""
        if self.format == "fp32":
            return
        if self.master:
            self.refresh()
            return
        from kernels._formats import round_to_format  # noqa: PLC0415

        for i, g in enumerate(self.groups):
            seed = (self.sr_seed * 1_000_003 + step * 7919 + i) & 0xFFFFFFFF
            round_to_format(g.p, "bf16", out=g.p, seed=seed)

    def round_grads(self) -> None:
        """Round the gradients to the format, as 16-bit gradient storage would (fp16: beyond
        65504 -> inf, below 6e-8 -> 0)."""
        if self.format == "fp32":
            return
        from kernels._formats import round_to_format  # noqa: PLC0415

        self.sync_grads()
        for g in self.groups:
            round_to_format(g.g, self.format, out=g.g)

    def unscale_clip(self, inv_scale: float, max_norm: float) -> tuple[float, bool]:
        """Gradients times ``inv_scale`` (undoing the loss scale), then clipped to ``max_norm``,
        in one pass; the norm (after unscaling, before clipping) and whether every gradient
        was finite. Non-finite: the gradients are left as they are (the step is skipped)."""
        norm = self.grad_norm() * inv_scale
        if not math.isfinite(norm):
            return norm, False
        factor = inv_scale
        if max_norm > 0 and norm > max_norm:
            factor *= max_norm / (norm + 1e-6)
        if factor != 1.0:
            for g in self.groups:
                g.g *= g.g.dtype.type(factor)
        return norm, True

    @contextlib.contextmanager
    def masters_in_params(self):
        """Inside: the parameters are the fp32 masters (for writing a checkpoint); after: the
        16-bit working copy again (the same buffer, untouched)."""
        if not self.master:
            yield
            return
        for g in self.groups:
            self._point_params(g, g.buffers["master"], None)
        try:
            yield
        finally:
            for g in self.groups:
                self._point_params(g, g.p, self.format)

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
