"""The fused LLM ops (import as ``F``): one Function each, hand-written backward.

Each forward computes through ``kernels`` (NumPy reference, Numba on the CPU, numba.cuda/CuPy on
the GPU: the array type picks, ``TINYLM_KERNELS=ref`` forces the reference); the derivative
math lives here, once, whatever the backend. ``docs/gradients.md`` derives the backward of
layer_norm, softmax + cross-entropy and attention in the notation used below.

Shape legend: B batch, T time, C channels, V vocabulary, NH heads, hs head size, N rows (B*T).

Each fused op is tested against the same math composed from the primitives in ``tinylm.ops``
(tests/test_functional.py), and its gradient against finite differences (``tinylm.gradcheck``).
"""
from __future__ import annotations

import numpy as np

import kernels
from tinylm.backend import is_gpu_array, to_device, xp_of
from tinylm.tensor import ACCUMULATED, Function, Tensor, is_grad_enabled


def _k(op, *arrays):
    return kernels.get(op, *arrays)


def _contig(xp, a):
    return xp.ascontiguousarray(a)


# ---- linear ---------------------------------------------------------------------------------
class Linear(Function):
    """out = x @ w + b, w (C_in, C_out) (GPT-2's Conv1D layout); with ``wt=True`` w is
    (C_out, C_in) and out = x @ w^T + b (PyTorch's nn.Linear layout, and the tied GPT head)."""
    lowp = "activation"
    saved_lowp = ("x", "w")

    def forward(self, x, w, b=None, wt=False, w_from=None):  # (..., C_in), w, (C_out,) -> (..., C_out)
        self.x, self.w, self.wt, self.has_bias = x, w, wt, b is not None
        self.w_from = w_from  # only the outputs from this one on need dw (see _trained_from)
        # one (N, C_in) @ (C_in, C_out) GEMM rather than NumPy's loop of per-batch GEMMs
        x2 = x.reshape(-1, x.shape[-1])
        out = _k("matmul", x)(x2, w.T if wt else w)
        out = out.reshape(x.shape[:-1] + (out.shape[1],))
        if b is not None:
            out += b
        return out

    def backward(self, dout):  # (..., C_out)
        xp = xp_of(dout)
        w_io = self.w.T if self.wt else self.w  # (C_in, C_out)
        c_in, c_out = w_io.shape
        x2 = self.x.reshape(-1, c_in)
        d2 = dout.reshape(-1, c_out)
        mm = _k("matmul", d2)
        # out = x @ w + b
        dx = mm(d2, w_io.T).reshape(self.x.shape) if self.needs_grad[0] else None  # d/dx = dout w^T
        dw = None
        if self.needs_grad[1] and self.w_from is not None:
            # only output features k >= w_from need their dw (the rest is dropped by the op
            # that made w): the product over those columns of dout, zeros elsewhere
            k = self.w_from
            dw = xp.zeros_like(self.w)
            if self.wt:
                dw[k:] = mm(xp.ascontiguousarray(d2[:, k:].T), x2)
            else:
                dw[:, k:] = mm(xp.ascontiguousarray(x2.T), xp.ascontiguousarray(d2[:, k:]))
        elif self.needs_grad[1]:  # d/dw = x^T dout, summed over rows; (dout^T x for w^T)
            a, b = (d2.T, x2) if self.wt else (x2.T, d2)
            sink = self.grad_sink(1)
            if sink is not None:  # straight into the optimizer's gradient buffer: no temporary
                _k("matmul_acc", d2)(a, b, sink)
                dw = ACCUMULATED
            else:
                dw = mm(a, b)
        if not self.has_bias:
            return dx, dw
        db = d2.sum(axis=0) if self.needs_grad[2] else None  # d/db = sum of dout over rows
        return dx, dw, (db if db is None else xp.asarray(db))


def _trained_from(w: Tensor, out_axis: int) -> dict:
    """A weight made by ``join_rows`` (tinylm/posttrain/lora.py: a vocabulary grown for new
    tokens, where only the new rows train) says so in ``w.trained_from = (start, axis)``; when
    that axis is the output features, the op computes dw for those outputs only, not the whole
    (V, C) product of which all but a few rows would be thrown away."""
    tf = getattr(w, "trained_from", None)
    return {"w_from": int(tf[0])} if tf is not None and tf[1] == out_axis else {}


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x @ w + b`` with ``w`` of shape (C_in, C_out), GPT-2's checkpoint layout."""
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"linear: x {x.shape} and w {w.shape} do not fit: need w of shape ({x.shape[-1]}, C_out)")
    if b is None:
        return Linear.apply(x, w, **_trained_from(w, 1))
    if b.shape != (w.shape[1],):
        raise ValueError(f"linear: bias has shape {b.shape}, expected ({w.shape[1]},)")
    return Linear.apply(x, w, b, **_trained_from(w, 1))


def linear_t(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x @ w.T + b`` with ``w`` of shape (C_out, C_in): PyTorch's nn.Linear layout, and the
    tied GPT head (logits = x @ wte^T) without a Transpose op in the graph, so the head's
    gradient is added into wte's gradient directly."""
    if w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear_t: x {x.shape} and w {w.shape} do not fit: need w of shape (C_out, {x.shape[-1]})")
    if b is None:
        return Linear.apply(x, w, wt=True, **_trained_from(w, 0))
    if b.shape != (w.shape[0],):
        raise ValueError(f"linear_t: bias has shape {b.shape}, expected ({w.shape[0]},)")
    return Linear.apply(x, w, b, wt=True, **_trained_from(w, 0))


# ---- layer norm -----------------------------------------------------------------------------
class LayerNorm(Function):
    lowp = "activation"
    saved_lowp = ("x2", "w")

    def forward(self, x, w, b, eps):  # (..., C), (C,), (C,) -> (..., C)
        xp = xp_of(x)
        self.in_shape = x.shape
        x2 = _contig(xp, x.reshape(-1, x.shape[-1]))
        out, self.mean, self.rstd = _k("layernorm_fwd", x2)(x2, w, b, float(eps))
        self.x2, self.w = x2, w
        return out.reshape(self.in_shape)

    def backward(self, dout):
        xp = xp_of(dout)
        d2 = _contig(xp, dout.reshape(self.x2.shape))
        dx, dw, db = _k("layernorm_bwd", d2)(d2, self.x2, self.w, self.mean, self.rstd)
        return dx.reshape(self.in_shape), dw, db


def layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise over the last axis: (x - mean) / sqrt(var + eps) * w + b (biased variance)."""
    c = x.shape[-1]
    if w.shape != (c,) or b.shape != (c,):
        raise ValueError(f"layer_norm: w {w.shape} and b {b.shape} must both be ({c},) for x {x.shape}")
    return LayerNorm.apply(x, w, b, eps=eps)


# ---- GELU -----------------------------------------------------------------------------------
class GELU(Function):
    lowp = "activation"
    saved_lowp = ("x",)

    def forward(self, x):
        xp = xp_of(x)
        self.x = _contig(xp, x)
        return _k("gelu_fwd", x)(self.x)

    def backward(self, dout):
        xp = xp_of(dout)
        return (_k("gelu_bwd", dout)(_contig(xp, dout), self.x),)


def gelu(x: Tensor) -> Tensor:
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return GELU.apply(x)


# ---- softmax, log-softmax -------------------------------------------------------------------
class Softmax(Function):
    def forward(self, x, axis):
        xp = xp_of(x)
        self.axis = axis
        e = xp.exp(x - x.max(axis=axis, keepdims=True))  # subtract the max: no overflow
        self.out = e / e.sum(axis=axis, keepdims=True)
        return self.out

    def backward(self, dout):
        # y = softmax(x): dy_i/dx_j = y_i (delta_ij - y_j)  ->  dx = y * (dout - sum(dout * y))
        y = self.out
        return (y * (dout - (dout * y).sum(axis=self.axis, keepdims=True)),)


class LogSoftmax(Function):
    def forward(self, x, axis):
        xp = xp_of(x)
        self.axis = axis
        m = x.max(axis=axis, keepdims=True)
        lse = m + xp.log(xp.exp(x - m).sum(axis=axis, keepdims=True))
        self.out = x - lse
        return self.out

    def backward(self, dout):
        # y = x - logsumexp(x)  ->  dx = dout - softmax(x) * sum(dout)
        xp = xp_of(dout)
        return (dout - xp.exp(self.out) * dout.sum(axis=self.axis, keepdims=True),)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return Softmax.apply(x, axis=axis % x.ndim)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return LogSoftmax.apply(x, axis=axis % x.ndim)


# ---- cross-entropy --------------------------------------------------------------------------
class CrossEntropy(Function):
    """Mean over non-ignored rows of -log softmax(logits)[target], fused with the softmax."""
    saved_lowp = ("logits",)

    def forward(self, logits, targets, ignore_index):  # (N, V), (N,) -> ()
        xp = xp_of(logits)
        logits = _contig(xp, logits)
        self.logits, self.targets, self.ignore_index = logits, targets, ignore_index
        loss_rows, self.lse = _k("cross_entropy_fwd", logits)(logits, targets, ignore_index)
        # all rows ignored: the loss is 0 with zero gradient (PyTorch gives NaN; a fully masked
        # SFT batch should not poison training)
        self.count = max(int((targets != ignore_index).sum()), 1)
        return xp.asarray(loss_rows.sum() / self.count, dtype=logits.dtype)

    def backward(self, dout):
        xp = xp_of(dout)
        # loss = sum_n loss_n / count  ->  dloss_n = dout / count (the kernel zeroes ignored rows)
        dloss_rows = xp.full(self.targets.shape, dout / self.count, dtype=self.logits.dtype)
        # loss_n = lse_n - logits[n, t_n]  ->  dlogits[n] = dloss_n (softmax(logits[n]) - onehot(t_n))
        return (_k("cross_entropy_bwd", self.logits)(self.logits, self.targets, self.lse, dloss_rows, self.ignore_index),)


def _checked_targets(xp, targets, shape, V: int, ignore_index: int, what: str, whose: str = ""):
    """(N,) int64 targets of the given leading shape, each in [0, V) or ignore_index; a bad one
    raises with ``what`` (the op) and ``whose`` (what needs that shape) in the message."""
    t = targets.data if isinstance(targets, Tensor) else targets
    t = xp.asarray(t) if xp is not np else np.asarray(to_device(t, "cpu") if is_gpu_array(t) else t)
    if t.dtype.kind not in "iu":
        raise TypeError(f"{what}: targets must be integers, got dtype {t.dtype}")
    if tuple(shape) != t.shape:
        raise ValueError(f"{what}: {whose}need targets of shape {tuple(shape)}, got {t.shape}")
    t = _contig(xp, t.reshape(-1).astype(np.int64, copy=False))
    bad = (t != ignore_index) & ((t < 0) | (t >= V))
    if bool(bad.any()):
        i = int(xp.argmax(bad))
        raise ValueError(f"{what}: target {int(t[i])} at row {i} is outside [0, {V}) and is not ignore_index={ignore_index}")
    return t


def cross_entropy(logits: Tensor, targets, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of (N, V) logits against (N,) integer targets (any leading shape
    works: (B, T, V) with (B, T)). Targets equal to ``ignore_index`` are left out of the mean."""
    V = logits.shape[-1]
    t = _checked_targets(xp_of(logits.data), targets, logits.shape[:-1], V, ignore_index, "cross_entropy",
                         f"logits {logits.shape} ")
    logits2 = logits if logits.ndim == 2 else logits.reshape(-1, V)
    return CrossEntropy.apply(logits2, targets=t, ignore_index=int(ignore_index))


# ---- LM head + cross-entropy, fused ---------------------------------------------------------
class HeadCrossEntropy(Function):
    """cross_entropy(linear_t(x, w), targets) without the (N, V) logits (kernels/head_ce.py).

    The kernel computes the loss and, in the same sweep over row chunks, dx and dw of
    L = sum_n loss_n / count; the gradient is linear in the incoming dout (a scalar), so backward
    only scales them: dx = dout * dx, and dout * dw is added into w's gradient buffer when it
    has one (Function.grad_sink: the ParamStore's flat buffer), in row blocks, with no
    temporary of the weight's size. The (V, C) dw kept from forward to backward replaces the
    (N, V) logits the unfused pair keeps (and their gradient): smaller whenever N > C."""

    native_inputs = (1,)  # a 16-bit w (a bf16/fp16 run's working copy) goes to the kernel as it is

    def forward(self, x, w, targets, ignore_index, w_from=None):  # (..., C), (V, C), (N,) -> ()
        xp = xp_of(x)
        self.x_shape, self.w_from = x.shape, w_from
        x2 = _contig(xp, x.reshape(-1, x.shape[-1]))
        count = max(int((targets != ignore_index).sum()), 1)
        grads = is_grad_enabled()
        want_dx, want_dw = grads and self.needs_grad[0], grads and self.needs_grad[1]
        head = _k("head_ce", x2)
        if w.dtype != x2.dtype and not getattr(head, "takes_16bit_w", False):
            from kernels._formats import to_f32  # noqa: PLC0415

            w = to_f32(w)  # a variant that reads float32 only (reference, GPU): the weight decoded whole
        loss_rows, _, self.dx, self.dw = head(
            x2, _contig(xp, w), targets, ignore_index, 1.0 / count, want_dx, want_dw, w_from or 0)
        # all rows ignored: loss 0, zero gradient (as F.cross_entropy)
        return xp.asarray(loss_rows.sum() / count, dtype=x.dtype)

    def backward(self, dout):
        g = float(dout)
        dx = None
        if self.needs_grad[0]:
            dx = (self.dx if g == 1.0 else self.dx * self.dx.dtype.type(g)).reshape(self.x_shape)
        if not self.needs_grad[1]:
            return dx, None
        if self.w_from:
            return dx, rows_from(self.dw, self.w_from, g)
        out = scaled_into_sink(self, 1, self.dw, g)
        self.lent = out is not ACCUMULATED and g == 1.0  # a view of dw went to the engine
        return dx, out

    def free(self):  # backward has run: dw's buffer serves the next step (kernels/head_ce.py),
        # unless a view of it went out as the gradient
        if not self.__dict__.get("lent", False):
            from kernels.head_ce import give_back  # noqa: PLC0415

            give_back(self.__dict__.get("dw"))
        super().free()


def rows_from(dw, k: int, g: float = 1.0):
    """The (V, C) gradient of a weight of which only rows k.. train (``_trained_from``), from
    those rows' (V - k, C) gradient ``dw`` times g: zeros above (the op that made the weight,
    join_rows, keeps the rows k..)."""
    full = xp_of(dw).zeros((k + dw.shape[0], dw.shape[1]), dtype=dw.dtype)
    full[k:] = dw if g == 1.0 else dw * dw.dtype.type(g)
    return full


def scaled_into_sink(fn: Function, i: int, dw, g: float = 1.0):
    """What ``fn.backward`` returns for input ``i`` whose gradient is ``g * dw``, ``dw`` an array
    the op keeps: added into the input's existing gradient buffer (Function.grad_sink: the
    ParamStore's flat buffer) in row blocks, with no temporary of dw's size, and ACCUMULATED
    returned; with no buffer, a view of dw (g == 1) or the scaled copy. A view, not dw itself:
    the engine copies it before a leaf keeps it as .grad (and adds into that), so dw stays
    intact for a retain_graph rerun."""
    sink = fn.grad_sink(i)
    if sink is None:
        return dw[:] if g == 1.0 else dw * dw.dtype.type(g)
    step = max(1, (1 << 20) // max(1, dw.shape[1]))  # ~4 MB of fp32 per block
    for a in range(0, dw.shape[0], step):
        if g == 1.0:
            sink[a:a + step] += dw[a:a + step]
        else:
            sink[a:a + step] += dw[a:a + step] * sink.dtype.type(g)
    return ACCUMULATED


def head_cross_entropy(x: Tensor, w: Tensor, targets, ignore_index: int = -100) -> Tensor:
    """``cross_entropy(linear_t(x, w), targets, ignore_index)``: the mean cross-entropy of the
    logits x @ w^T (w (V, C): the tied embedding or an untied head in PyTorch's layout), fused
    so that only a chunk of rows' logits exists at a time (kernels/head_ce.py). x (..., C),
    targets of x's leading shape; ignore_index rows are left out of the mean; a batch with none
    gives 0 with zero gradient. A head whose weight trains only some rows (LoRA's grown
    vocabulary, ``trained_from``) gets the gradient of those rows only."""
    if w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"head_cross_entropy: x {x.shape} and w {w.shape} do not fit: need w of shape (V, {x.shape[-1]})")
    xp = xp_of(x.data)
    t = _checked_targets(xp, targets, x.shape[:-1], w.shape[0], int(ignore_index), "head_cross_entropy")
    return HeadCrossEntropy.apply(x, w, targets=t, ignore_index=int(ignore_index), **_trained_from(w, 0))


# ---- embedding ------------------------------------------------------------------------------
class Embedding(Function):
    lowp = "activation"

    def forward(self, weight, ids):  # (V, C), ids (...) -> (..., C)
        self.ids, self.V = ids, weight.shape[0]
        return _k("embedding_fwd", weight)(ids, weight)

    def backward(self, dout):
        xp = xp_of(dout)
        # out[i] = weight[ids[i]]  ->  dweight[v] = sum of dout[i] over every i with ids[i] == v
        return (_k("embedding_bwd", dout)(_contig(xp, dout), self.ids, self.V),)


def embedding(ids, weight: Tensor) -> Tensor:
    """Rows of ``weight`` (V, C) picked by integer ``ids`` of any shape -> ids.shape + (C,)."""
    xp = xp_of(weight.data)
    i = ids.data if isinstance(ids, Tensor) else ids
    i = xp.asarray(i) if is_gpu_array(weight.data) else np.asarray(i)
    if i.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {i.dtype}")
    V = weight.shape[0]
    if i.size and (int(i.min()) < 0 or int(i.max()) >= V):
        bad = int(i.min()) if int(i.min()) < 0 else int(i.max())
        raise ValueError(f"embedding: id {bad} is outside the table's [0, {V})")
    return Embedding.apply(weight, ids=_contig(xp, i.astype(np.int64, copy=False)))


# ---- causal self-attention ------------------------------------------------------------------
class CausalSelfAttention(Function):
    lowp = "activation"
    saved_lowp = ("q", "k", "v", "out")

    def forward(self, q, k, v):  # (B, NH, T, hs), (B, NKV, T, hs) x2 -> (B, NH, T, hs)
        xp = xp_of(q)
        q, k, v = (_contig(xp, a) for a in (q, k, v))
        self.out, self.lse = _k("attention_fwd", q)(q, k, v)
        self.q, self.k, self.v = q, k, v
        return self.out

    def backward(self, dout):
        xp = xp_of(dout)
        # out = softmax(q k^T / sqrt(hs) + causal mask) v; the kernel recomputes the
        # probabilities from lse (docs/gradients.md has the derivation)
        return _k("attention_bwd", dout)(_contig(xp, dout), self.q, self.k, self.v, self.out, self.lse)


def causal_self_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hs), masked to j <= t) v on q (B, NH, T, hs) and k, v
    (B, NKV, T, hs) tensors, NKV dividing NH (grouped-query attention: query head h reads kv
    head h // (NH / NKV); NKV = NH is standard multi-head attention)."""
    ok = q.ndim == 4 and k.shape == v.shape and k.ndim == 4 and k.shape[1] >= 1
    if not ok or (k.shape[0], k.shape[2], k.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]) or q.shape[1] % k.shape[1]:
        raise ValueError(f"causal_self_attention: need q (B, NH, T, hs) and k, v of one shape (B, NKV, T, hs) with NKV dividing NH, got {q.shape}, {k.shape}, {v.shape}")
    return CausalSelfAttention.apply(q, k, v)


# ---- dropout --------------------------------------------------------------------------------
class Dropout(Function):
    lowp = "follow"

    def forward(self, x, mask):
        self.mask = mask
        return x * mask

    def backward(self, dout):
        # out = x * mask, mask = keep / (1 - p)
        return (dout * self.mask,)


def dropout(x: Tensor, p: float, training: bool, rng: np.random.Generator | None = None) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) (inverted dropout).
    Identity when not training or p == 0. ``rng`` (a numpy Generator) makes it reproducible."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    rng = rng if rng is not None else np.random.default_rng()
    keep = rng.random(x.shape) >= p
    mask = (keep / (1.0 - p)).astype(x.compute_dtype)
    if is_gpu_array(x.data):
        mask = to_device(mask, "gpu")
    return Dropout.apply(x, mask=mask)


# ---- attention on a fused qkv projection ----------------------------------------------------
class AttentionQKV(Function):
    """Split (B, T, 3C) into heads, causal attention, merge heads back to (B, T, C), as one op.

    The same math as ``q, k, v = split(qkv); causal_self_attention(q, k, v)`` with transposes,
    without three gather-backwards each writing a full (B, T, 3C) array of zeros.
    """
    lowp = "activation"
    saved_lowp = ("q", "k", "v", "out")

    def forward(self, qkv, n_head):  # (B, T, 3C) -> (B, T, C)
        xp = xp_of(qkv)
        B, T, C3 = qkv.shape
        C = C3 // 3
        self.n_head = n_head
        # (B, T, 3, NH, hs) -> (3, B, NH, T, hs): views; a kernel that needs contiguous heads
        # copies them itself (the CPU default reads the strided rows in place)
        heads = qkv.reshape(B, T, 3, n_head, C // n_head).transpose(2, 0, 3, 1, 4)
        q, k, v = heads[0], heads[1], heads[2]
        out, self.lse = _k("attention_fwd", q)(q, k, v)
        self.q, self.k, self.v, self.out = q, k, v, out
        # (B, NH, T, hs) -> (B, T, C): free when the kernel wrote out in (B, T, NH, hs) order
        return _contig(xp, out.transpose(0, 2, 1, 3)).reshape(B, T, C)

    def backward(self, dout):  # (B, T, C)
        xp = xp_of(dout)
        B, T, C = dout.shape
        hs = C // self.n_head
        # out = merge(y): undo the merge, then the attention backward, then the split
        dy = dout.reshape(B, T, self.n_head, hs).transpose(0, 2, 1, 3)
        dq, dk, dv = _k("attention_bwd", dy)(dy, self.q, self.k, self.v, self.out, self.lse)
        dqkv = _qkv_grad_buffer(dq, dk, dv)  # the CPU default already wrote them as (B, T, 3C)
        if dqkv is None:
            dqkv = xp.empty((B, T, 3, self.n_head, hs), dtype=dout.dtype)
            for i, d in enumerate((dq, dk, dv)):
                dqkv[:, :, i] = d.transpose(0, 2, 1, 3)
        return (dqkv.reshape(B, T, 3 * C),)


def _qkv_grad_buffer(dq, dk, dv):
    """The (B, T, 3, NH, hs) array that dq, dk, dv (B, NH, T, hs) are views of, in that order
    (as kernels.attention's cpu_gemm returns them), or None: the caller then merges them itself."""
    g = dq.base
    if g is None or dk.base is not g or dv.base is not g or g.ndim != 5 or not g.flags.c_contiguous:
        return None
    B, NH, T, hs = dq.shape
    if g.shape != (B, T, 3, NH, hs):
        return None
    base = g.__array_interface__["data"][0]
    strides = g[:, :, 0].transpose(0, 2, 1, 3).strides
    for i, d in enumerate((dq, dk, dv)):
        if d.strides != strides or d.__array_interface__["data"][0] != base + i * NH * hs * g.itemsize:
            return None
    return g


def attention_qkv(qkv: Tensor, n_head: int, cache=None, layer: int = 0, start: int = 0) -> Tensor:
    """Causal self-attention from a fused projection: qkv (B, T, 3C) -> (B, T, C).

    With a KV cache (generation: no autograd) the T positions start at ``start``, their keys
    and values are stored in ``cache`` (layer ``layer``) and they attend over every cached
    position; without one, the training op with its backward."""
    if cache is not None and is_grad_enabled() and qkv.requires_grad:
        raise RuntimeError("attention with a KV cache is for inference: run it under tinylm.no_grad()")
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * n_head):
        raise ValueError(f"attention_qkv: qkv {qkv.shape} must be (B, T, 3C) with C divisible by n_head={n_head}")
    if cache is not None:
        B, T, C3 = qkv.shape
        heads = qkv.data.reshape(B, T, 3, n_head, C3 // (3 * n_head)).transpose(2, 0, 3, 1, 4)
        y = _cached_attention(heads[0], heads[1], heads[2], cache, layer, start)  # (B, NH, T, hs)
        return Tensor(_contig(xp_of(y), y.transpose(0, 2, 1, 3)).reshape(B, T, C3 // 3))
    return AttentionQKV.apply(qkv, n_head=int(n_head))


# ---- attention over a KV cache (generation) -------------------------------------------------
def _cached_attention(q, k, v, cache, layer: int, start: int):
    """Arrays q (B, NH, T, hs), k, v (B, NKV, T, hs) of T new positions at ``start``: store k, v
    in the cache and attend over every cached position up to start + T - 1."""
    K, V = cache.update(layer, k, v, start)
    return _k("attention_decode", q)(q, K, V, start)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, cache=None, layer: int = 0, start: int = 0) -> Tensor:
    """Causal attention on (B, NH, T, hs) queries and (B, NKV, T, hs) keys and values (NKV
    divides NH: grouped-query attention). Without a cache: the training op, with a backward
    (``causal_self_attention``). With a KV cache (``tinylm.models.cache``): the T new positions
    start at ``start`` and attend over everything cached so far; inference only."""
    if cache is None:
        return causal_self_attention(q, k, v)
    if is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError("attention with a KV cache is for inference: run it under tinylm.no_grad()")
    return Tensor(_cached_attention(q.data, k.data, v.data, cache, layer, start))


# ---- Llama ops: RMSNorm, RoPE, SwiGLU ----
class RMSNorm(Function):
    lowp = "activation"
    saved_lowp = ("x2", "w")

    def forward(self, x, w, eps):  # (..., C), (C,) -> (..., C)
        xp = xp_of(x)
        self.in_shape = x.shape
        x2 = _contig(xp, x.reshape(-1, x.shape[-1]))
        out, self.rstd = _k("rmsnorm_fwd", x2)(x2, w, float(eps))
        self.x2, self.w = x2, w
        return out.reshape(self.in_shape)

    def backward(self, dout):
        xp = xp_of(dout)
        d2 = _contig(xp, dout.reshape(self.x2.shape))
        # out = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps)  ->  dw = sum over rows of
        # dout * x * rstd, dx = rstd (dout w - xhat mean(dout w xhat)) (rstd depends on all of x)
        dx, dw = _k("rmsnorm_bwd", d2)(d2, self.x2, self.w, self.rstd)
        return dx.reshape(self.in_shape), dw


def rms_norm(x: Tensor, w: Tensor, eps: float = 1e-6) -> Tensor:
    """Llama's RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * w (no mean, no bias)."""
    c = x.shape[-1]
    if w.shape != (c,):
        raise ValueError(f"rms_norm: w {w.shape} must be ({c},) for x {x.shape}")
    return RMSNorm.apply(x, w, eps=eps)


class RoPE(Function):
    lowp = "activation"

    def forward(self, x, cos, sin, interleaved):  # (B, T, NH, hs), (T, hs/2) x2 -> (B, T, NH, hs)
        xp = xp_of(x)
        self.cos, self.sin, self.interleaved = cos, sin, interleaved
        return _k("rope_fwd", x)(_contig(xp, x), cos, sin, interleaved)

    def backward(self, dout):
        xp = xp_of(dout)
        # out = R(angle) x on each pair, R a rotation  ->  dx = R(angle)^T dout = R(-angle) dout
        return (_k("rope_bwd", dout)(_contig(xp, dout), self.cos, self.sin, self.interleaved),)


def rope(x: Tensor, cos, sin, interleaved: bool = False) -> Tensor:
    """Rotary position embedding on x (B, T, NH, hs) with tables cos, sin (T, hs/2) (plain
    arrays, no gradient: ``kernels.rope.rope_tables`` makes them). ``interleaved=False`` rotates
    the pairs (i, i + hs/2) (Hugging Face Llama's rotate_half), True the pairs (2i, 2i + 1)."""
    cos, sin = (c.data if isinstance(c, Tensor) else c for c in (cos, sin))
    if x.ndim != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope: x must be (B, T, NH, hs) with an even hs, got {x.shape}")
    T, hs = x.shape[1], x.shape[-1]
    if tuple(cos.shape) != (T, hs // 2) or tuple(sin.shape) != (T, hs // 2):
        raise ValueError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be ({T}, {hs // 2}) for x {x.shape}")
    xp = xp_of(x.data)
    if is_gpu_array(x.data):
        cos, sin = xp.asarray(cos), xp.asarray(sin)
    else:
        cos, sin = (np.asarray(to_device(c, "cpu") if is_gpu_array(c) else c) for c in (cos, sin))
    cos, sin = (_contig(xp, c.astype(x.compute_dtype, copy=False)) for c in (cos, sin))
    return RoPE.apply(x, cos=cos, sin=sin, interleaved=bool(interleaved))


class SwiGLU(Function):
    lowp = "activation"
    saved_lowp = ("a", "b")

    def forward(self, a, b):  # (...), (...) -> (...)
        xp = xp_of(a)
        self.a, self.b = _contig(xp, a), _contig(xp, b)
        return _k("swiglu_fwd", a)(self.a, self.b)

    def backward(self, dout):
        xp = xp_of(dout)
        # out = a sig(a) * b  ->  da = dout b sig(a) (1 + a (1 - sig(a))), db = dout a sig(a)
        da, db = _k("swiglu_bwd", dout)(_contig(xp, dout), self.a, self.b)
        return da, db


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b = a * sigmoid(a) * b elementwise (Llama's MLP: swiglu(x W_gate, x W_up))."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"swiglu: a and b must share one shape and dtype, got {a.shape} {a.dtype} and {b.shape} {b.dtype}")
    return SwiGLU.apply(a, b)
