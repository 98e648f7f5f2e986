"""The primitive ops: one Function each, forward and hand-written backward side by side.

The set is micrograd-sized: add, sub, mul, div, neg, pow, exp, log, tanh, sum, max, reshape,
transpose, index (gather), matmul, cast. Everything else is a composition of these (``mean`` is
``sum`` times 1/n, ``x ** t`` for a tensor exponent is ``exp(t * log x)``), and the fused LLM
ops in ``tinylm.functional`` are tested against the same math composed from them.

Conventions: ``forward`` gets arrays and returns an array; it keeps what ``backward`` needs as
named attributes. ``backward(dout)`` returns one gradient per input, in input order, with the
*output's* broadcast shape where the op broadcasts: the engine sums broadcast dimensions away.
Each backward line says which forward line it differentiates.
"""
from __future__ import annotations

import numbers

import numpy as np

import kernels
from tinylm.backend import scatter_add, xp_of
from tinylm.tensor import Function, Tensor


class Add(Function):
    lowp = "follow"

    def forward(self, a, b):
        return a + b

    def backward(self, dout):
        # out = a + b  ->  dout flows unchanged to both (the engine undoes broadcasting)
        return dout, dout


class Sub(Function):
    lowp = "follow"

    def forward(self, a, b):
        return a - b

    def backward(self, dout):
        # out = a - b
        return dout, -dout


class Mul(Function):
    lowp = "follow"
    saved_lowp = ("a", "b")

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, dout):
        # out = a * b  ->  d/da = b, d/db = a
        da = dout * self.b if self.needs_grad[0] else None
        db = dout * self.a if self.needs_grad[1] else None
        return da, db


class Div(Function):
    saved_lowp = ("a", "b")

    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, dout):
        # out = a / b  ->  d/da = 1/b, d/db = -a/b^2
        da = dout / self.b if self.needs_grad[0] else None
        db = -dout * self.a / (self.b * self.b) if self.needs_grad[1] else None
        return da, db


class Neg(Function):
    lowp = "follow"

    def forward(self, a):
        return -a

    def backward(self, dout):
        return (-dout,)


class Pow(Function):
    """``a ** p`` for a constant real exponent p."""
    saved_lowp = ("a",)

    def forward(self, a, p):
        self.a, self.p = a, p
        return a**p

    def backward(self, dout):
        # out = a^p  ->  d/da = p a^(p-1)
        return dout * self.p * self.a ** (self.p - 1), None


def pow(a: Tensor, exponent) -> Tensor:  # noqa: A001 (mirrors the operator)
    if isinstance(exponent, Tensor):
        # a ** t = exp(t * log a): defined for a > 0 only, as the real power is
        return (exponent * a.log()).exp()
    if not isinstance(exponent, numbers.Real):
        raise TypeError(f"exponent must be a real number or a Tensor, got {type(exponent).__name__}")
    return Pow.apply(a, exponent)


def rpow(base, t: Tensor) -> Tensor:
    """``base ** t`` for a constant base > 0: exp(t * log(base))."""
    base = float(base)
    if base <= 0:
        raise ValueError(f"base ** tensor needs a positive base, got {base}")
    return (t * float(np.log(base))).exp()


class Exp(Function):
    def forward(self, a):
        self.out = xp_of(a).exp(a)
        return self.out

    def backward(self, dout):
        # out = e^a  ->  d/da = e^a = out
        return (dout * self.out,)


class Log(Function):
    saved_lowp = ("a",)

    def forward(self, a):
        self.a = a
        return xp_of(a).log(a)

    def backward(self, dout):
        # out = log a  ->  d/da = 1/a
        return (dout / self.a,)


class Tanh(Function):
    def forward(self, a):
        self.out = xp_of(a).tanh(a)
        return self.out

    def backward(self, dout):
        # out = tanh a  ->  d/da = 1 - tanh^2 a
        return (dout * (1 - self.out * self.out),)


class Sum(Function):
    def forward(self, a, axis, keepdims):
        self.in_shape, self.axis, self.keepdims = a.shape, axis, keepdims
        return a.sum(axis=axis, keepdims=keepdims)

    def backward(self, dout):
        # out = sum over axis  ->  every summed element gets dout: re-insert the axes, broadcast
        xp = xp_of(dout)
        if not self.keepdims:
            dout = dout.reshape([1 if i in self.axis else n for i, n in enumerate(self.in_shape)])
        return (xp.broadcast_to(dout, self.in_shape).copy(),)  # a fresh array: a leaf may keep it


class Max(Function):
    """Max over axes; the gradient goes to the maximal elements, split evenly between ties
    (the subgradient PyTorch's ``amax`` uses)."""
    saved_lowp = ("a",)

    def forward(self, a, axis, keepdims):
        self.a, self.axis, self.keepdims = a, axis, keepdims
        self.out = a.max(axis=axis, keepdims=True)
        return self.out if keepdims else self.out.reshape([n for i, n in enumerate(a.shape) if i not in axis])

    def backward(self, dout):
        if not self.keepdims:
            dout = dout.reshape(self.out.shape)
        # out = max(a)  ->  d/da = 1 where a == max (ties share it), else 0
        mask = (self.a == self.out).astype(self.a.dtype)
        return (dout * mask / mask.sum(axis=self.axis, keepdims=True),)


class Reshape(Function):
    lowp = "move"

    def forward(self, a, shape):
        self.in_shape = a.shape
        return a.reshape(shape)

    def backward(self, dout):
        return (dout.reshape(self.in_shape),)


class Transpose(Function):
    lowp = "move"

    def forward(self, a, axes):
        self.axes = axes
        return a.transpose(axes)

    def backward(self, dout):
        # out = a.transpose(axes)  ->  undo with the inverse permutation
        return (dout.transpose(tuple(np.argsort(self.axes))),)


class Cast(Function):
    def forward(self, a, dtype):
        self.in_dtype = a.dtype
        return a.astype(dtype)

    def backward(self, dout):
        return (dout.astype(self.in_dtype),)


class Index(Function):
    """``a[index]`` with ints, slices, None, Ellipsis and integer arrays (gather)."""

    def forward(self, a, index):
        self.in_shape, self.in_dtype, self.index = a.shape, a.dtype, index
        return a[index]

    def backward(self, dout):
        # out = a[index]  ->  scatter-add dout back; an element picked twice gets both gradients
        xp = xp_of(dout)
        da = xp.zeros(self.in_shape, dtype=self.in_dtype)
        scatter_add(xp, da, self.index, dout)
        return (da,)


def index(a: Tensor, idx) -> Tensor:
    def conv(i):
        if isinstance(i, Tensor):
            i = i.data
        if isinstance(i, (list, np.ndarray)) or type(i).__module__.startswith("cupy"):
            arr = xp_of(a.data).asarray(i)
            if arr.dtype.kind == "b":
                raise TypeError("boolean mask indexing is not supported; use integer indices (np.nonzero(mask))")
            if arr.dtype.kind not in "iu":
                raise TypeError(f"index arrays must be integers, got dtype {arr.dtype}")
            return arr
        return i

    idx = tuple(conv(i) for i in idx) if isinstance(idx, tuple) else conv(idx)
    return Index.apply(a, index=idx)


def _mm(a, b):
    """a @ b; 2-D products go through the matmul kernel (BLAS threaded by Numba on the CPU)."""
    if a.ndim == 2 and b.ndim == 2:
        return kernels.get("matmul", a, b)(a, b)
    return a @ b


class MatMul(Function):
    """``a @ b`` with NumPy's rules: batch dimensions broadcast; a 1-D operand is a vector."""
    saved_lowp = ("a", "b")

    def forward(self, a, b):
        self.a, self.b = a, b
        return _mm(a, b)

    def backward(self, dout):
        xp = xp_of(dout)
        a, b = self.a, self.b
        if a.ndim == 1 and b.ndim == 1:
            # out = sum_k a_k b_k  ->  da = dout * b, db = dout * a
            return dout * b, dout * a
        # promote 1-D operands to matrices so one formula covers every case
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        d2 = dout
        if a.ndim == 1:
            d2 = xp.expand_dims(d2, -2)
        if b.ndim == 1:
            d2 = xp.expand_dims(d2, -1)
        # out = a @ b  ->  da = dout @ b^T,  db = a^T @ dout
        da = db = None
        if self.needs_grad[0]:
            da = _mm(d2, xp.swapaxes(b2, -1, -2))
            da = da.reshape(da.shape[:-2] + (da.shape[-1],)) if a.ndim == 1 else da
        if self.needs_grad[1]:
            db = _mm(xp.swapaxes(a2, -1, -2), d2)
            db = db.reshape(db.shape[:-2] + (db.shape[-2],)) if b.ndim == 1 else db
        return da, db
