"""LoRA: low-rank adapters on a frozen model (Hu et al. 2021, "LoRA: Low-Rank Adaptation").

A Linear-like layer y = x W + b gets y = x W + b + (x A) B * (alpha / r), with A (C_in, r)
drawn at random (std 1/sqrt(C_in)), B (r, C_out) zero, so a fresh adapter changes nothing.
Only A and B train: every base parameter is frozen (``requires_grad = False``), so the
ParamStore and AdamW hold only the adapters, and no op computes a frozen input's gradient
(``Function.needs_grad``): the backward of a frozen layer is one GEMM (dx), not two.

The adapted layer is one op, ``lora_linear`` (``LoRALinearOp``): over many rows it merges the
adapter into the weight on the fly (W + s A B, a rank-r product), so forward and dx are each
one GEMM of the layer's size, and the rank-r products go to one direct BLAS call each rather
than the threaded matmul kernel. Measured (benchmarks/posttrain.py, config M, shared 2-core
machine): a LoRA step cost 1.61x a full fine-tuning step when the adapter was five ops (two
linears, a scale, an add, the base linear), 0.78x as one op. Before, the base products were
already skipped; the adapters' 143 small products per step, each a Numba parallel launch
that waits for the other core, took 1.1 s of a 3.5 s step.

``apply_lora(model, rank, alpha, targets)`` swaps each target layer for a ``LoRALinear`` that
keeps the layer's own ``weight`` and ``bias`` attributes (so parameter names, and a checkpoint
of the base, are unchanged) and returns a ``LoRAModel``: the model with its state dict cut to
the adapters (``lora_A``/``lora_B``, plus ``added_rows.<name>``: the vocabulary rows that
``grow_vocab`` added for the chat tokens, which train beside the adapters while the rows the
checkpoint had stay frozen; ``GrownRows`` below). The Trainer saves that as an adapter-only checkpoint; its
state.json's ``"lora"`` names the base checkpoint (``tinylm.posttrain.stage.load_policy`` puts
them back together).

A layer is Linear-like if it is a ``tinylm.nn.Linear`` (weight (C_in, C_out), ``F.linear``) or
has a 2-D ``weight`` and a ``layout`` attribute: "in_out" (F.linear) or "out_in" (PyTorch's
layout, ``F.linear_t``: a Llama projection). ``targets``: "all" (every Linear-like layer but
the LM head) or names matched against the end of each layer's dotted path ("c_attn",
"attn.c_proj", "q_proj"). The head (``lm_head``, Llama's untied one) is never adapted: the
models compute their logits from the head's weight directly (``F.linear_t(x, head.weight)``,
as GPT's tied head), so an adapter there would train nothing; naming it is an error. (Found by
the Llama tests: "all" used to wrap it, and its adapters never got a gradient.)

``merge`` folds the adapters into the weights (W += s A B, or its transpose), after which the
forward is the base forward, as fast; ``unmerge`` subtracts them again; ``disabled(model)``
runs the base model with the adapters switched off (DPO's and GRPO's reference model: no copy
of the weights).

Leaves out: dropout on the adapter input, DoRA, rsLoRA scaling, adapters on embeddings.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

import kernels
from tinylm import functional as F
from tinylm.backend import xp_of
from tinylm.nn import Linear, Module, Parameter
from tinylm.tensor import ACCUMULATED, Function, Tensor

ADDED_ROWS = "added_rows."  # state-dict prefix of vocabulary rows the base checkpoint lacks
HEADS = ("lm_head",)  # top-level names of an LM head, never adapted (see above)


def freeze(p) -> None:
    """Stop training a parameter. Its cached graph node remembers requires_grad, so it goes too."""
    p.requires_grad = False
    p._node = None
    p.grad = None


def layout_of(mod) -> str | None:
    """"in_out", "out_in", or None when ``mod`` is not Linear-like."""
    if isinstance(mod, LoRALinear):
        return None
    lay = getattr(mod, "layout", None)
    w = getattr(mod, "weight", None)
    if lay is not None and getattr(w, "ndim", 0) == 2:
        if lay not in ("in_out", "out_in"):
            raise ValueError(f"{type(mod).__name__}.layout is {lay!r}; LoRA knows 'in_out' and 'out_in'")
        return lay
    if isinstance(mod, Linear):
        return "in_out"
    return None


# ---- the adapted layer as one op ----------------------------------------------------------------
def _small_mm(a, b):
    """A product with a rank-r side (r << C): one direct BLAS call (cuBLAS on the GPU).

    Not the threaded ``matmul`` kernel: each of its calls is a Numba parallel launch, and on a
    shared 2-core machine a launch waits for a time slice on the other core. Measured at config M
    (2048 rows, r = 8, another job on the cores): (2048, 384) @ (384, 8) 4.0-8.0 ms through the
    kernel, 0.25-0.30 ms through np.matmul (OpenBLAS, one thread); 143 such products made the
    adapters 40% of a LoRA step."""
    return xp_of(a).matmul(a, b)


class LoRALinearOp(Function):
    """out = x W + bias + s (x A) B in one op, W frozen or not; inputs (x, W, A, B[, bias]).

    W is (C_in, C_out), or (C_out, C_in) with ``wt`` (then x W^T). With at least as many rows
    as inputs (training: N = B*T >= C_in) the adapter is merged on the fly, W' = W + s A B (a
    (C_in, r) @ (r, C_out) product, N / r times cheaper than the layer's), so the forward is
    one GEMM of the layer's size and so is dx = dout W'^T, instead of the layer's GEMM plus two
    rank-r products of N rows and an (N, C_out) add each way. W' is recomputed in the backward,
    not kept: the adapters add no weight-sized array between forward and backward. With fewer
    rows (generation) the factored form x W + s (x A) B is cheaper and is used.

    Backward, g = dout B^T (N, r) and h = x A (N, r):
        dx = dout W'^T (merged) or dout W^T + s g A^T;  dA = s x^T g;  dB = s h^T dout;
        dW = x^T dout (dout^T x with wt), only if W requires grad;  dbias = sum of dout rows.
    Each is computed only for an input that needs it (``needs_grad``): a frozen W costs no
    weight-gradient product. B = 0 gives W' = W exactly, so a fresh adapter is bit-for-bit the
    base layer.
    """
    lowp = "activation"
    saved_lowp = ("x2", "w", "a", "b")

    def forward(self, x, w, a, b, bias=None, scale=1.0, wt=False):
        xp = xp_of(x)
        self.shape, self.wt, self.has_bias = x.shape, wt, bias is not None
        c_in = a.shape[0]
        x2 = x.reshape(-1, c_in)
        self.x2, self.w, self.a, self.b, self.s = x2, w, a, b, scale
        mm = kernels.get("matmul", x2)
        self.fold = x2.shape[0] >= c_in
        if self.fold:
            out = mm(x2, self._merged_io())
        else:
            out = mm(x2, w.T if wt else w)
            out += _small_mm(_small_mm(x2, a) * xp.asarray(scale, dtype=x.dtype), b)
        if bias is not None:
            out += bias
        return out.reshape(x.shape[:-1] + (out.shape[1],))

    def _merged_io(self):
        """W' = W + s A B as the (C_in, C_out) operand: for wt a transposed view of the
        (C_out, C_in) array W + s B^T A^T, so the GEMM reads it as it reads W."""
        s = xp_of(self.a).asarray(self.s, dtype=self.a.dtype)
        if self.wt:
            d = _small_mm(self.b.T, self.a.T * s)  # (C_out, C_in), C-contiguous like W
            d += self.w
            return d.T
        d = _small_mm(self.a * s, self.b)  # (C_in, C_out)
        d += self.w
        return d

    def backward(self, dout):
        xp = xp_of(dout)
        need_x, need_w, need_a, need_b = self.needs_grad[:4]
        x2, a, b, w = self.x2, self.a, self.b, self.w
        s = xp.asarray(self.s, dtype=a.dtype)
        d2 = dout.reshape(-1, b.shape[1])
        mm = kernels.get("matmul", d2)
        g = _small_mm(d2, b.T) * s if (need_x and not self.fold) or need_a else None  # s dout B^T
        dx = dw = da = db = None
        if need_x:
            if self.fold:
                dx = mm(d2, self._merged_io().T)
            else:
                dx = mm(d2, w if self.wt else w.T)
                dx += _small_mm(g, a.T)
            dx = dx.reshape(self.shape)
        if need_a:
            da = _small_mm(x2.T, g)  # (C_in, r)
        if need_b:
            db = _small_mm((_small_mm(x2, a) * s).T, d2)  # (r, C_out)
        if need_w:
            lhs, rhs = (d2.T, x2) if self.wt else (x2.T, d2)
            sink = self.grad_sink(1)
            if sink is not None:  # into the optimizer's gradient buffer, as F.linear does
                kernels.get("matmul_acc", d2)(lhs, rhs, sink)
                dw = ACCUMULATED
            else:
                dw = mm(lhs, rhs)
        if not self.has_bias:
            return dx, dw, da, db
        dbias = xp.asarray(d2.sum(axis=0)) if self.needs_grad[4] else None
        return dx, dw, da, db, dbias


def lora_linear(x: Tensor, w: Tensor, a: Tensor, b: Tensor, bias: Tensor | None = None, scale: float = 1.0,
                layout: str = "in_out") -> Tensor:
    """x W + bias + scale (x A) B; W (C_in, C_out) for ``layout="in_out"``, (C_out, C_in) for
    "out_in" (x W^T); A (C_in, r), B (r, C_out)."""
    n_in, n_out = w.shape if layout == "in_out" else w.shape[::-1]
    r = a.shape[1] if a.ndim == 2 else -1
    if x.shape[-1] != n_in or a.shape != (n_in, r) or b.shape != (r, n_out):
        raise ValueError(f"lora_linear: x {x.shape}, W {w.shape} ({layout}), A {a.shape}, B {b.shape} do not fit")
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"lora_linear: bias has shape {bias.shape}, expected ({n_out},)")
    args = (x, w, a, b) if bias is None else (x, w, a, b, bias)
    return LoRALinearOp.apply(*args, scale=float(scale), wt=layout == "out_in")


def lora_linear_ref(x, w, a, b, bias=None, scale: float = 1.0, layout: str = "in_out") -> np.ndarray:
    """NumPy reference of ``lora_linear`` in float64: x W + bias + s (x A) B."""
    x, w, a, b = (np.asarray(t, dtype=np.float64) for t in (x, w, a, b))
    w_io = w if layout == "in_out" else w.T
    out = x @ w_io + scale * ((x @ a) @ b)
    return out if bias is None else out + np.asarray(bias, dtype=np.float64)


class LoRALinear(Module):
    """A frozen Linear-like layer plus a trainable low-rank update."""

    def __init__(self, base, rank: int, alpha: float, rng, layout: str):
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        self.layout = layout
        self._orig = {"layer": base}  # a dict: not walked as a child, so names stay the base's
        w = self.weight
        n_in, n_out = w.shape if layout == "in_out" else w.shape[::-1]
        self.lora_A = Parameter(rng.normal(0.0, 1.0 / math.sqrt(n_in), (n_in, rank)), dtype=w.dtype)
        self.lora_B = Parameter(np.zeros((rank, n_out)), dtype=w.dtype)
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.enabled, self.merged = True, False

    def forward(self, x):  # (..., C_in) -> (..., C_out)
        if self.enabled and not self.merged:
            return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.bias, self.scale, self.layout)
        lin = F.linear if self.layout == "in_out" else F.linear_t
        return lin(x, self.weight, self.bias)

    def delta(self) -> np.ndarray:
        """s A B in the weight's layout."""
        d = self.scale * (self.lora_A.values() @ self.lora_B.values())  # (C_in, C_out)
        return d if self.layout == "in_out" else d.T

    def merge(self) -> None:
        if not self.merged:
            self.weight.assign(self.weight.values() + self.delta())
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.weight.assign(self.weight.values() - self.delta())
            self.merged = False


# ---- vocabulary rows that grow_vocab added: trained beside the adapters --------------------------
class JoinRowsOp(Function):
    """W = [base rows before ``start``; added rows] along ``axis`` (0: rows, 1: columns), the
    frozen rows a checkpoint had and the trainable rows grow_vocab added, as one weight.

    Backward: dW's slice of the added rows goes to them; the base gets nothing (frozen). The
    result says which rows train (``trained_from``), so a head reading it (``F.linear_t``)
    computes its weight gradient for those rows only, not the (V, C) product; the embedding's
    scatter writes the whole (V, C) gradient (a memset and B*T rows) of which the rows are kept.
    ``joined`` is the result when the caller has it already (``GrownRows`` keeps one per
    value of the added rows, so generation does not copy the table every token)."""

    def forward(self, base, added, start=0, axis=0, joined=None):
        self.start, self.axis = start, axis
        return _concat(base, added, start, axis) if joined is None else joined

    def backward(self, dw):
        part = dw[self.start:] if self.axis == 0 else dw[:, self.start:]
        return None, xp_of(dw).ascontiguousarray(part)


def _concat(base, added, start, axis):
    return xp_of(base).concatenate([base[:start] if axis == 0 else base[:, :start], added], axis=axis)


def join_rows(base: Tensor, added: Tensor, start: int, axis: int = 0, joined=None) -> Tensor:
    """[base[:start]; added] along ``axis``, differentiable in ``added``."""
    if base.ndim != 2 or added.ndim != 2 or not 0 <= start <= base.shape[axis]:
        raise ValueError(f"join_rows: base {base.shape}, added {added.shape}, start {start}, axis {axis} do not fit")
    other = 1 - axis
    if added.shape[other] != base.shape[other]:
        raise ValueError(f"join_rows: added {added.shape} does not match base {base.shape} along axis {other}")
    out = JoinRowsOp.apply(base, added, start=int(start), axis=int(axis), joined=joined)
    # only these rows train: a linear op reading ``out`` computes its weight gradient for them only
    # (tinylm.functional._trained_from); others compute it whole and this op keeps the rows
    out.trained_from = (int(start), int(axis))
    return out


def join_rows_ref(base, added, start: int, axis: int = 0) -> np.ndarray:
    """NumPy reference of ``join_rows``."""
    base = np.asarray(base)
    return np.concatenate([base[:start] if axis == 0 else base[:, :start], np.asarray(added)], axis=axis)


class GrownRows:
    """Mixed into a token embedding's (or an untied head's) own class by ``LoRAModel``: the
    module's ``weight`` attribute reads as ``join_rows(base, grown)``, where ``base`` is the
    frozen Parameter it had (still in ``vars(module)["weight"]``, so parameter names and the
    base checkpoint are unchanged) and ``grown`` a trainable copy of the rows from
    ``rows_start`` on. Every reader of ``.weight``, the module's forward and a tied head's
    ``F.linear_t(x, wte.weight)`` alike, sees the trained rows, and both send them gradient.

    A property is a data descriptor, so it wins over the instance dict for reading; setting
    ``.weight`` writes the base. ``rows_enabled = False`` (``disabled``) reads the base, whose
    added rows keep their initial values: the reference model."""

    @property
    def weight(self):
        d = self.__dict__
        base, grown = d["weight"], d["grown"]
        if not d["rows_enabled"]:
            return base
        xp = xp_of(base.data)
        c = d.get("_rows_cache")
        if c is None or c[0] is not base.data or c[1].shape != grown.shape or not bool(xp.array_equal(c[1], grown.data)):
            c = (base.data, grown.data.copy(), _concat(base.data, grown.data, d["rows_start"], d["rows_axis"]))
            d["_rows_cache"] = c
        return join_rows(base, grown, d["rows_start"], d["rows_axis"], joined=c[2])

    @weight.setter
    def weight(self, value):
        self.__dict__["weight"] = value


_GROWN_CLASSES: dict = {}


def grow_rows(mod, start: int, axis: int) -> Parameter:
    """Make ``mod``'s rows (``axis`` 1: columns) from ``start`` on trainable; returns them."""
    cls = type(mod)
    if cls not in _GROWN_CLASSES:
        _GROWN_CLASSES[cls] = type(f"Grown{cls.__name__}", (GrownRows, cls), {"__module__": __name__})
    base = vars(mod)["weight"]
    rows = base.data[start:] if axis == 0 else base.data[:, start:]
    if rows.size == 0:
        raise ValueError(f"added_rows: {type(mod).__name__} has {base.shape[axis]} rows, none from {start} on")
    grown = Parameter(np.ascontiguousarray(rows), dtype=base.dtype)
    mod.__class__ = _GROWN_CLASSES[cls]
    vars(mod).update(grown=grown, rows_start=int(start), rows_axis=int(axis), rows_enabled=True)
    return grown


def ungrow_rows(mod) -> None:
    """Write the trained rows into the base weight and give ``mod`` its own class back."""
    d = vars(mod)
    base, grown, start = d["weight"], d["grown"], d["rows_start"]
    if d["rows_axis"] == 0:
        base.data[start:] = grown.data
    else:
        base.data[:, start:] = grown.data
    for k in ("grown", "rows_start", "rows_axis", "rows_enabled", "_rows_cache"):
        d.pop(k, None)
    mod.__class__ = type(mod).__bases__[1]  # (GrownRows, the module's own class)


def _walk(mod, prefix=""):
    """(parent, attribute name, list index or None, dotted path, child module) for every
    submodule held by an attribute or a list."""
    for name, value in list(vars(mod).items()):
        if isinstance(value, Module):
            yield mod, name, None, f"{prefix}{name}", value
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, Module):
                    yield mod, name, i, f"{prefix}{name}.{i}", v


def _lora_layers(model) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def parse_targets(targets) -> list[str]:
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    out = [t for t in targets if t]
    if not out:
        raise ValueError("lora_targets is empty: give 'all' or layer names such as c_attn,c_fc")
    return out


class LoRAModel(Module):
    """A model with adapters: forward, generation and config are the model's; the parameters it
    lists are all of them (frozen ones too); ``state_dict`` is the adapters only."""

    def __init__(self, model, rank: int, alpha: float, targets, seed: int = 0, added_rows: dict | None = None):
        if rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {rank}")
        self.model = model
        self.lora_config = {"rank": int(rank), "alpha": float(alpha), "targets": parse_targets(targets)}
        self.added_rows = dict(added_rows or {})  # param name -> first added row
        for p in model.parameters():
            freeze(p)
        rng = np.random.default_rng(seed)
        tg = self.lora_config["targets"]
        heads = [t for t in tg if t in HEADS or t.endswith(tuple("." + h for h in HEADS))]
        if heads:
            raise ValueError(f"lora_targets {','.join(heads)}: the LM head cannot take an adapter (the model reads "
                             f"its weight directly); adapt the layers in the blocks")
        wrapped = []
        todo = [("", model)]
        while todo:
            prefix, mod = todo.pop(0)
            for parent, attr, idx, path, child in _walk(mod, prefix):
                lay = layout_of(child)
                hit = lay is not None and path not in HEADS and (
                    "all" in tg or any(path == t or path.endswith("." + t) for t in tg))
                if hit:
                    new = LoRALinear(child, rank, alpha, rng, lay)
                    if idx is None:
                        setattr(parent, attr, new)
                    else:
                        getattr(parent, attr)[idx] = new
                    wrapped.append(path)
                elif lay is None:
                    todo.append((path + ".", child))
        if not wrapped:
            raise ValueError(f"lora_targets {','.join(tg)}: no Linear-like layer matched in {type(model).__name__}")
        self.wrapped = wrapped
        self.grown = {}  # base parameter name -> (module, its trainable added rows)
        if self.added_rows:
            from tinylm.posttrain.chat import _vocab_params  # noqa: PLC0415

            axes = {n: axis for n, _, axis in _vocab_params(model)}
            owners = {id(vars(m).get("weight")): m for m in model.modules()}
            params = dict(model.named_parameters())
            for name, start in self.added_rows.items():
                if name not in axes:
                    raise ValueError(f"added_rows: {name} is not a token embedding or head of {type(model).__name__}")
                mod = owners[id(params[name])]
                self.grown[name] = (mod, grow_rows(mod, start, axes[name]))

    def __getattr__(self, name):  # only called for names not found normally: the model's
        model = self.__dict__.get("model")
        if model is None:
            raise AttributeError(name)
        return getattr(model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def named_parameters(self, prefix: str = ""):
        return self.model.named_parameters(prefix)

    def adapters(self) -> list[tuple[str, Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]

    def trainable(self) -> list[tuple[str, Parameter]]:
        """The adapters, then the added vocabulary rows (named ``added_rows.<base name>``)."""
        return self.adapters() + [(ADDED_ROWS + n, g) for n, (_, g) in self.grown.items()]

    def param_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": [p for _, p in self.trainable()], "weight_decay": weight_decay}]

    def state_dict(self) -> dict:
        return {n: p.numpy().copy() for n, p in self.trainable()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        params = dict(self.model.named_parameters())
        mine = {n for n, _ in self.trainable()}
        missing, unexpected = sorted(mine - set(state)), sorted(set(state) - mine)
        if strict and (missing or unexpected):
            raise KeyError(f"adapter state: missing {missing[:6]}, unexpected {unexpected[:6]}")
        for key, a in state.items():
            if key.startswith(ADDED_ROWS):
                g = self.grown[key[len(ADDED_ROWS):]][1]
                if a.shape != g.shape:
                    raise ValueError(f"adapter state: {key} has shape {a.shape}, the model {g.shape}")
                g.assign(a)
            elif key in params:
                p = params[key]
                if a.shape != p.shape:
                    raise ValueError(f"adapter state: {key} has shape {a.shape}, the model {p.shape}")
                p.assign(a)

    def merge(self) -> None:
        for m in _lora_layers(self.model):
            m.merge()

    def merged_model(self):
        """The base model with the adapters merged into its weights and the original layers put
        back (plain parameter names, all trainable): a full model. The adapters are gone."""
        self.merge()
        for mod, _ in self.grown.values():
            ungrow_rows(mod)
        self.grown = {}
        todo = [self.model]
        while todo:
            mod = todo.pop()
            for parent, attr, idx, _, child in _walk(mod):
                if isinstance(child, LoRALinear):
                    orig = child._orig["layer"]
                    if idx is None:
                        setattr(parent, attr, orig)
                    else:
                        getattr(parent, attr)[idx] = orig
                else:
                    todo.append(child)
        for p in self.model.parameters():
            p.requires_grad = True
            p._node = None
        return self.model

    def unmerge(self) -> None:
        for m in _lora_layers(self.model):
            m.unmerge()


def apply_lora(model, rank: int, alpha: float = 16.0, targets="all", seed: int = 0,
               added_rows: dict | None = None) -> LoRAModel:
    return LoRAModel(model, rank, alpha, targets, seed, added_rows)


@contextlib.contextmanager
def disabled(model):
    """The base model: every adapter switched off inside the block (refused while merged)."""
    inner = model.model if isinstance(model, LoRAModel) else model
    layers = _lora_layers(inner)
    if any(m.merged for m in layers):
        raise RuntimeError("disabled(): the adapters are merged into the weights; unmerge first")
    rows = [m for m in inner.modules() if isinstance(m, GrownRows)]
    prev = [m.enabled for m in layers], [vars(m)["rows_enabled"] for m in rows]
    for m in layers:
        m.enabled = False
    for m in rows:
        vars(m)["rows_enabled"] = False
    try:
        yield model
    finally:
        for m, e in zip(layers, prev[0]):
            m.enabled = e
        for m, e in zip(rows, prev[1]):
            vars(m)["rows_enabled"] = e
