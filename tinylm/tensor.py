"""Tensor, Function and the reverse-mode engine.

A ``Tensor`` wraps a NumPy (or CuPy) array. Every operation on tensors is a ``Function``
subclass (see ``tinylm.ops`` and ``tinylm.functional``) whose ``forward`` computes on arrays and
keeps what its backward needs as named attributes, and whose ``backward`` returns one gradient
per tensor input. The engine here is the only place that:

- orders the graph (iteratively, so a 10,000-op chain does not hit Python's recursion limit),
- accumulates gradients when a tensor is used more than once, and into ``.grad`` across calls,
- sums gradients over broadcast dimensions (so no op has to),
- checks each gradient's shape against its tensor and names the op when it does not match,
- frees each op's saved arrays once its backward has run (unless ``retain_graph=True``),
- offers a backward the leaf's existing ``.grad`` to add into directly (``Function.grad_sink``),
  so a weight gradient needs no temporary of the weight's size.

The graph is made of small nodes (``_Node``: the producing Function, shape, dtype, and for a
leaf its Tensor), not of tensors, so an intermediate result that no op saved is freed as soon
as user code drops it. Measured on GPT-2 small (config L of benchmarks/train_step.py): peak
memory of a training step 3,612 -> 3,247 MiB.

Deliberately left out: double backward (backward is not itself recorded), in-place ops on
tensors that require grad, and ``.grad`` on non-leaf tensors (as in PyTorch, only leaves keep
one).

Reference: micrograd's engine (one op's forward and backward side by side), Chainer's Function.
"""
from __future__ import annotations

import contextlib
import numbers
import sys
import weakref

import numpy as np

from tinylm.backend import is_gpu_array, to_device, xp_of

_grad_enabled = True
_autocast: str | None = None  # "bf16" / "fp16" inside ``autocast(fmt)``: activations kept in that format


class _Accumulated:
    """Returned by a backward for an input whose gradient it already added into
    ``Function.grad_sink(i)``."""

    def __repr__(self):
        return "ACCUMULATED"


ACCUMULATED = _Accumulated()


@contextlib.contextmanager
def no_grad():
    """Inside ``with no_grad():`` operations record nothing: outputs do not require grad."""
    global _grad_enabled
    prev, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = prev


def is_grad_enabled() -> bool:
    return _grad_enabled


@contextlib.contextmanager
def autocast(fmt: str | None):
    """Inside ``with autocast("bf16"):`` (or ``"fp16"``) the activations are 16-bit Tensors.

    How (the ``Function.lowp`` modes and ``Function.saved_lowp``):
    - every op computes in float32: a 16-bit input is decoded to a float32 temporary first
      (exact: every bf16/fp16 value is a float32), so every forward and backward is the fp32 code;
    - an "activation" op (a layer: linear, norms, attention, gelu/swiglu, rope, embedding)
      stores its output in the format (round to nearest even), so the Tensor that flows to the
      next op, and that the next op keeps for its backward, is 2 bytes a value; elementwise
      arithmetic (the residual add, dropout) follows its inputs: 16-bit in, 16-bit out, so a
      loss or a log-prob difference computed from float32 values stays float32; ops that make
      statistics, losses and log-probabilities ("fp32" ops: sum, exp, log, cross-entropy, the
      fused head) keep a float32 output;
    - the arrays a Function keeps for backward (listed in its ``saved_lowp``) are kept in the
      format: the 16-bit input itself where the array is (a reshape of) an input's decoded
      temporary, else rounded once; they are decoded again just before its backward runs;
    - gradients stay float32 (a 16-bit Tensor's gradient is float32, like its master weight).

    ``autocast(None)`` or ``autocast("fp32")`` turns it off (generation runs so: its KV cache
    is float32). Nests; restores the previous setting on exit."""
    global _autocast
    if fmt not in (None, "fp32", "bf16", "fp16"):
        raise ValueError(f"autocast: format must be fp32, bf16 or fp16, got {fmt!r}")
    prev, _autocast = _autocast, (None if fmt in (None, "fp32") else fmt)
    try:
        yield
    finally:
        _autocast = prev


def autocast_format() -> str | None:
    """The activation format in effect ("bf16", "fp16"), or None (float32)."""
    return _autocast


def _decode(a):
    from kernels._formats import to_f32  # noqa: PLC0415 (kernels imports nothing of tinylm)

    return to_f32(a)  # the storage dtype says the format: uint16 bf16, float16 fp16


def _encode(x, fmt: str):
    from kernels._formats import from_f32  # noqa: PLC0415

    return from_f32(x, fmt)


def _same_memory(a, base) -> bool:
    """``a`` is ``base`` or a whole-array contiguous reshape of it (a view of the same bytes)."""
    if a is base:
        return True
    if a.size != base.size or a.dtype != base.dtype or not (a.flags.c_contiguous and base.flags.c_contiguous):
        return False
    return _address(a) == _address(base)


def _address(a) -> int:
    return a.data.ptr if is_gpu_array(a) else a.__array_interface__["data"][0]


class _Node:
    """A tensor's place in the graph: what backward needs of it, without its data.

    The graph holds nodes, not tensors, so an intermediate result that no op saved for backward
    (the input of an ``Add``, say) is freed as soon as user code drops it, as PyTorch does;
    only the arrays a Function kept on itself stay alive. A leaf's node holds a *weak*
    reference to its Tensor, the one place gradients are written: the Tensor holds its node,
    and a strong pointer back would make a cycle, so a leaf and its ``.grad`` would be freed
    only by Python's cyclic GC. Measured (docs/performance.md, "cyclic garbage"): a loop that
    made a fresh (8, 256, 1536) leaf each iteration ran ``gelu(x).sum().backward()`` in
    26-31 ms instead of 4.9 ms, and held 1.2 GB. A leaf that user code has dropped has nobody
    to read its gradient, so backward skips it.
    """

    __slots__ = ("ctx", "requires_grad", "leaf", "shape", "dtype", "freed")

    def __init__(self, ctx, requires_grad, leaf, shape, dtype):
        self.ctx, self.requires_grad = ctx, requires_grad
        self.leaf = None if leaf is None else weakref.ref(leaf)  # call it to get the Tensor (or None)
        self.shape, self.dtype, self.freed = shape, dtype, False


class Function:
    """One differentiable op. Subclasses define ``forward(self, *arrays, **settings)`` and
    ``backward(self, dout)``; positional inputs of ``apply`` are tensors (or things that become
    constant tensors), keyword arguments are non-differentiable settings."""

    def forward(self, *arrays, **settings):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dout):  # pragma: no cover - abstract
        raise NotImplementedError

    # How the op meets 16-bit Tensors (see ``autocast``): "fp32" (inputs decoded, output float32),
    # "activation" (a layer: inputs decoded, output stored in the autocast format), "follow"
    # (elementwise arithmetic: inputs decoded, output stored in the format of its 16-bit input,
    # float32 when it has none, so a loss or a log-prob difference stays float32), "move" (pure
    # data movement: a 16-bit input passes through as it is).
    lowp = "fp32"
    # names of the arrays forward keeps on self that are activations (kept in the format)
    saved_lowp: tuple = ()
    # positions of inputs handed to forward as stored (16-bit bits) because the op reads that
    # format itself (the fused head decodes its weight block by block: kernels/head_ce.py)
    native_inputs: tuple = ()

    def free(self) -> None:
        """Drop what forward saved: called once backward has run and the graph is not retained.
        An op whose saved arrays can serve the next step (kernels/head_ce.py's dw) hands them
        back first."""
        self.__dict__.clear()

    def grad_sink(self, i: int):
        """The array input ``i``'s gradient will be added into, when backward may add its share
        there itself; else None.

        That is the ``.grad`` of a leaf input that already has one of the input's shape and
        dtype: an optimizer's flat gradient buffer (tinylm.optim.AdamW), or the result of an
        earlier backward. A backward that adds into it (e.g. a GEMM with beta = 1) returns
        ``ACCUMULATED`` for that input, and the engine adds nothing more. Why: a Linear's weight
        gradient then needs no temporary of the weight's size and no separate add pass (GPT-2
        small: its 154 MB tied embedding gradient was the largest array alive at the peak).
        """
        node = self.parents[i]
        leaf = None if node.leaf is None else node.leaf()
        if node.ctx is not None or leaf is None or not node.requires_grad:
            return None
        g = leaf.grad
        if g is None or g.shape != node.shape or g.dtype != node.dtype:
            return None
        return g

    @classmethod
    def apply(cls, *inputs, **settings) -> "Tensor":
        ref = next((t for t in inputs if isinstance(t, Tensor)), None)
        tensors = tuple(t if isinstance(t, Tensor) else _constant(t, ref) for t in inputs)
        ctx = cls()
        # which inputs need a gradient: backward may skip the others (return None for them)
        ctx.needs_grad = tuple(t.requires_grad for t in tensors)
        requires = _grad_enabled and any(ctx.needs_grad)
        fmts = tuple(t.fmt for t in tensors)
        if _autocast is None and not any(fmts):  # the float32 path: nothing to convert
            out = ctx.forward(*(t.data for t in tensors), **settings)
            result = Tensor(out, requires_grad=requires, dtype=out.dtype)
        else:
            result = _apply_lowp(ctx, tensors, fmts, requires, settings)
        if requires:
            ctx.parents = tuple(t._graph_node() for t in tensors)
            result._node = _Node(ctx, True, None, result.shape, result.compute_dtype)
        return result


def _apply_lowp(ctx: Function, tensors, fmts, requires: bool, settings) -> "Tensor":
    """Function.apply's forward when 16-bit Tensors or autocast are involved (see ``autocast``)."""
    mode = type(ctx).lowp
    datas = [t.data for t in tensors]
    if mode == "move":
        ins = datas
    else:
        native = type(ctx).native_inputs
        ins = [d if f is None or i in native else _decode(d) for i, (d, f) in enumerate(zip(datas, fmts))]
    out = ctx.forward(*ins, **settings)
    first = next((f for f in fmts if f is not None), None)  # the format of a 16-bit input
    to = {"activation": _autocast, "follow": first}.get(mode)  # the format the output is stored in
    fmt = first if mode == "move" else None  # moved 16-bit data keeps its format
    out16 = None
    if to is not None and getattr(out, "dtype", None) == np.float32:
        out16, fmt = _encode(out, to), to
    if requires and type(ctx).saved_lowp:
        _pack_saved(ctx, datas, fmts, ins, out, out16, fmt)
    if out16 is not None:
        return Tensor(out16, requires_grad=requires, fmt=fmt)
    return Tensor(out, requires_grad=requires, dtype=out.dtype, fmt=fmt)


def _pack_saved(ctx: Function, datas, fmts, ins, out, out16, fmt) -> None:
    """Keep the activations ``ctx`` saved (``saved_lowp``) in their 16-bit format (see
    ``_kept_16bit``); ``ctx._lowp_saved`` names them, for ``_unpack_saved``."""
    packed = []
    for name in type(ctx).saved_lowp:
        a = ctx.__dict__.get(name)
        if a is None or getattr(a, "dtype", None) != np.float32:
            continue
        kept = _kept_16bit(a, datas, fmts, ins, out, out16, fmt)
        if kept is not None:
            setattr(ctx, name, kept)
            packed.append(name)
    if packed:
        ctx._lowp_saved = tuple(packed)


def _kept_16bit(a, datas, fmts, ins, out, out16, fmt):
    """The 16-bit array to keep in place of the saved float32 ``a``, or None to keep ``a``: the
    input's own 16-bit array where ``a`` is (a reshape of) its decoded temporary; nothing where
    ``a`` is a float32 input (a weight the model keeps anyway); the stored output where ``a`` is
    the output; else, for an op whose output is stored in the format, ``a`` rounded once."""
    for d, f, x in zip(datas, fmts, ins):
        if _same_memory(a, x):
            return None if f is None else d.reshape(a.shape)
    if out16 is None:
        return None
    if _same_memory(a, out):
        return out16.reshape(a.shape)
    return _encode(a, fmt)


def _unpack_saved(ctx: Function):
    """Before ``ctx.backward``: its 16-bit saved arrays decoded to float32 temporaries.
    Returns the 16-bit ones, to put back when the graph is retained."""
    kept = {name: getattr(ctx, name) for name in ctx.__dict__.get("_lowp_saved", ())}
    for name, a in kept.items():
        setattr(ctx, name, _decode(a))
    return kept or None


def _constant(value, ref: "Tensor | None") -> "Tensor":
    """A non-tensor operand (Python number, array) as a tensor that needs no gradient.
    Python numbers take the other operand's dtype, so ``x * 2`` stays float32."""
    if ref is not None and isinstance(value, numbers.Number) and not isinstance(value, bool):
        xp = xp_of(ref.data)
        return Tensor(xp.asarray(value, dtype=ref.compute_dtype))  # a 16-bit operand: a float32 number
    if ref is not None and is_gpu_array(ref.data) and not is_gpu_array(value):
        value = to_device(np.asarray(value), "gpu")
    return Tensor(value)


def _default_dtype(data):
    """float32 for Python floats and float lists; keep a given array's dtype (float64 stays
    float64 for gradient checks); int64 for Python ints; bool stays bool."""
    if isinstance(data, np.ndarray) or is_gpu_array(data):
        return data.dtype
    if isinstance(data, np.generic):
        return data.dtype
    arr = np.asarray(data)
    if arr.dtype.kind == "f":
        return np.float32
    if arr.dtype.kind in "iu":
        return np.int64
    return arr.dtype


class Tensor:
    """An n-dimensional array that remembers how it was computed.

    >>> a = tensor([1.0, 2.0], requires_grad=True)
    >>> ((a * a).sum()).backward()
    >>> a.grad
    array([2., 4.], dtype=float32)
    """

    __array_priority__ = 1000  # so ndarray + Tensor calls Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, dtype=None, fmt: str | None = None):
        if isinstance(data, Tensor):
            fmt = data.fmt if fmt is None else fmt
            data = data.data
        if fmt is not None:  # a 16-bit Tensor: bf16 bits in uint16, or fp16 (see ``autocast``)
            want = {"bf16": np.uint16, "fp16": np.float16}.get(fmt)
            if want is None:
                raise ValueError(f"Tensor: fmt must be 'bf16' or 'fp16', got {fmt!r}")
            if np.dtype(data.dtype) != want:
                raise TypeError(f"Tensor: a {fmt} Tensor holds {np.dtype(want).name} data, got {data.dtype}")
            dtype = want
        if dtype is None:
            dtype = _default_dtype(data)
        if is_gpu_array(data):
            data = data.astype(dtype, copy=False)
        else:
            data = np.asarray(data, dtype=dtype)
        if requires_grad and data.dtype.kind != "f" and fmt is None:
            raise TypeError(f"only floating-point tensors can require grad, got dtype {data.dtype}")
        self.data = data
        self.fmt = fmt  # "bf16"/"fp16" for a 16-bit Tensor (its .data the stored bits); None otherwise
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._node: _Node | None = None  # set when an op produces it or consumes it

    def _graph_node(self) -> _Node:
        if self._node is None:  # a leaf (or a constant) entering the graph
            self._node = _Node(None, self.requires_grad, self if self.requires_grad else None, self.shape,
                               self.compute_dtype)
        return self._node

    @property
    def _ctx(self):
        """The Function that produced this tensor (None for leaves and after backward)."""
        return None if self._node is None else self._node.ctx

    # ---- basic properties -------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: "gpu" if is_gpu_array(self.data) else "cpu")

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = ", device='gpu'" if self.device == "gpu" else ""
        dt = self.dtype if self.fmt is None else self.fmt
        return f"Tensor({np.array2string(self.numpy(), precision=4)}, dtype={dt}{dev}{grad})"

    @property
    def compute_dtype(self):
        """The dtype its values compute in and its gradient has: its own, float32 for a 16-bit
        Tensor (whose ``.dtype`` is the storage's: uint16 for bf16, float16)."""
        return np.dtype(np.float32) if self.fmt is not None else self.data.dtype

    def values(self):
        """The data as values in ``compute_dtype``, on its device: a 16-bit Tensor's decoded
        to float32 (a new array), any other Tensor's ``.data`` itself."""
        return self.data if self.fmt is None else _decode(self.data)

    def assign(self, values) -> None:
        """Write ``values`` into ``.data`` in place, so a view (a parameter store's flat buffer)
        sees them; a 16-bit Tensor stores them rounded to its format (nearest even)."""
        xp = xp_of(self.data)
        if self.fmt is None:
            self.data[...] = xp.asarray(values, dtype=self.dtype)
            return
        from kernels._formats import round_to_format  # noqa: PLC0415

        v = xp.array(values, dtype=np.float32)  # a copy: rounded in place, then stored
        self.data[...] = _encode(round_to_format(v, self.fmt), self.fmt)

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied from the GPU if needed); a 16-bit Tensor's values
        as float32 (its ``.data`` holds the stored bits)."""
        return to_device(self.values(), "cpu")

    def item(self) -> float:
        return self.numpy().item()

    def detach(self) -> "Tensor":
        return Tensor(self.data, fmt=self.fmt)

    def to(self, device: str) -> "Tensor":
        """A copy on "cpu" or "gpu" (CuPy); the result is a new leaf."""
        return Tensor(to_device(self.data, device), requires_grad=self.requires_grad)

    def astype(self, dtype) -> "Tensor":
        from tinylm import ops

        return ops.Cast.apply(self, dtype=np.dtype(dtype))

    # ---- the engine -------------------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        ``grad`` defaults to 1 for a single-element tensor. The graph is freed as it is walked
        (saved arrays released) unless ``retain_graph=True``.
        """
        root = self._graph_node()
        if root.freed:
            raise RuntimeError(
                "backward through a graph that was already freed: pass retain_graph=True to the "
                "first backward() to call it twice on the same graph"
            )
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (built under no_grad, or from constants)")
        xp = xp_of(self.data)
        grad_given = grad
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a single-element tensor, got shape {self.shape}")
            grad = xp.ones(self.shape, dtype=self.compute_dtype)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.compute_dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(grad): grad has shape {grad.shape}, tensor has shape {self.shape}")

        grads = {id(root): grad}
        # how many graph edges each gradient array was handed to: a leaf may keep an array as
        # its .grad without a copy only if it owns its memory and no other node holds it (Add's
        # backward returns one dout for both inputs; a user's grad= array is theirs)
        handed = {id(grad): 1 if grad_given is None else 2}
        for node in reversed(_topological_order(root)):
            g = grads.pop(id(node), None)
            if g is None:
                continue  # no path from the output reached this node's requires-grad inputs
            ctx = node.ctx
            if ctx is None:  # a leaf: accumulate in place, so an optimizer's flat gradient
                # buffer (whose views the parameters' .grad are) receives it with no copy
                leaf = node.leaf()
                if leaf is None:
                    continue  # user code dropped this leaf: nobody can read its gradient
                if leaf.grad is None:
                    # a fresh array nobody else holds becomes .grad as it is (no copy of a
                    # possibly large gradient); anything shared or a view is copied
                    alone = handed.get(id(g), 2) == 1 and _sole_owner(g)
                    leaf.grad = g if alone else g.copy()
                else:
                    leaf.grad += g
                continue
            kept = _unpack_saved(ctx)  # 16-bit saved activations decoded for this backward
            in_grads = ctx.backward(g)
            if kept and retain_graph:
                ctx.__dict__.update(kept)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            op = type(ctx).__name__
            if len(in_grads) != len(ctx.parents):
                raise RuntimeError(f"{op}.backward returned {len(in_grads)} gradients for {len(ctx.parents)} inputs")
            for i, (parent, pg) in enumerate(zip(ctx.parents, in_grads)):
                if pg is None or pg is ACCUMULATED or not parent.requires_grad:
                    continue
                pg = _reduce_to_shape(pg, parent.shape, op, i)
                if pg.dtype != parent.dtype:
                    pg = pg.astype(parent.dtype)
                key = id(parent)
                if key in grads:
                    grads[key] = grads[key] + pg
                    handed[id(grads[key])] = 1
                else:
                    grads[key] = pg
                    handed[id(pg)] = handed.get(id(pg), 0) + 1
            if not retain_graph:
                node.ctx = None
                node.freed = True
                ctx.free()  # release the saved activations now, not at the end

    # ---- operators (all defined in tinylm.ops; imported late to avoid a cycle) -----------
    def __add__(self, other):
        return _ops().Add.apply(self, other)

    def __radd__(self, other):
        return _ops().Add.apply(other, self)

    def __sub__(self, other):
        return _ops().Sub.apply(self, other)

    def __rsub__(self, other):
        return _ops().Sub.apply(other, self)

    def __mul__(self, other):
        return _ops().Mul.apply(self, other)

    def __rmul__(self, other):
        return _ops().Mul.apply(other, self)

    def __truediv__(self, other):
        return _ops().Div.apply(self, other)

    def __rtruediv__(self, other):
        return _ops().Div.apply(other, self)

    def __neg__(self):
        return _ops().Neg.apply(self)

    def __pow__(self, exponent):
        return _ops().pow(self, exponent)

    def __rpow__(self, base):
        return _ops().rpow(base, self)

    def __matmul__(self, other):
        return _ops().MatMul.apply(self, other)

    def __rmatmul__(self, other):
        return _ops().MatMul.apply(other, self)

    def __getitem__(self, index):
        return _ops().index(self, index)

    def sum(self, axis=None, keepdims=False):
        return _ops().Sum.apply(self, axis=_norm_axis(axis, self.ndim), keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        axes = _norm_axis(axis, self.ndim)
        n = int(np.prod([self.shape[a] for a in axes])) if axes else 1
        return self.sum(axis=axis, keepdims=keepdims) * (1.0 / n)

    def max(self, axis=None, keepdims=False):
        return _ops().Max.apply(self, axis=_norm_axis(axis, self.ndim), keepdims=keepdims)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _ops().Reshape.apply(self, shape=shape)

    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        if not axes:
            axes = tuple(reversed(range(self.ndim)))
        return _ops().Transpose.apply(self, axes=tuple(a % self.ndim for a in axes))

    @property
    def T(self):
        return self.transpose()

    def exp(self):
        return _ops().Exp.apply(self)

    def log(self):
        return _ops().Log.apply(self)

    def tanh(self):
        return _ops().Tanh.apply(self)


def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    """Build a Tensor. Python floats become float32, ints int64; arrays keep their dtype
    unless ``dtype`` is given."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


def _ops():
    from tinylm import ops  # noqa: PLC0415 (ops imports this module)

    return ops


def _norm_axis(axis, ndim: int) -> tuple[int, ...]:
    """None -> all axes; int or tuple -> a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    out = []
    for a in axis:
        if not -ndim <= a < max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        out.append(a % max(ndim, 1))
    return tuple(sorted(set(out)))


def saved_bytes(t: Tensor) -> dict[str, int]:
    """What the graph behind ``t`` keeps for its backward, in bytes per dtype ("uint16" is bf16):
    the arrays its Functions saved, each counted once, leaves' own data (the weights) left out.
    A 16-bit run's activations show up here at half their float32 size (see ``autocast``)."""
    if t._node is None or t._node.ctx is None:
        return {}
    order = _topological_order(t._node)
    leaves = {_address(n.leaf().data) for n in order if n.ctx is None and n.leaf is not None and n.leaf() is not None}
    seen: dict[int, tuple[str, int]] = {}
    for n in order:
        for v in (n.ctx.__dict__.values() if n.ctx is not None else ()):
            if getattr(v, "dtype", None) is None or not hasattr(v, "nbytes") or getattr(v, "ndim", 0) == 0:
                continue
            a = _address(v)
            if a not in leaves and v.nbytes > seen.get(a, ("", 0))[1]:
                seen[a] = (v.dtype.name, int(v.nbytes))
    out: dict[str, int] = {}
    for name, nb in seen.values():
        out[name] = out.get(name, 0) + nb
    return out


def _topological_order(root: _Node) -> list[_Node]:
    """Every node that requires grad and leads to ``root``, inputs before outputs.

    Iterative depth-first post-order: each node is emitted after all of its inputs. An explicit
    stack instead of recursion, so a chain of any depth works.
    """
    order: list[_Node] = []
    seen: set[int] = set()
    stack: list[tuple[_Node, bool]] = [(root, False)]
    while stack:
        node, inputs_done = stack.pop()
        if inputs_done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        if node.ctx is not None:
            for parent in node.ctx.parents:
                if parent.requires_grad and id(parent) not in seen:
                    if parent.freed:
                        raise RuntimeError("backward through a graph that was already freed: use retain_graph=True")
                    stack.append((parent, False))
    return order


def _sole_owner(g) -> bool:
    """True when ``g`` owns its memory, or is a whole-array contiguous view (a reshape) of an
    array that nothing else references: then it can become a leaf's .grad without a copy.
    (A kernel's output reshaped by its op's backward is the common case: LayerNorm's dx.)"""
    b = getattr(g, "base", 0)
    if b is None:
        return True
    if not isinstance(b, np.ndarray) or b.base is not None or not g.flags.c_contiguous or g.size != b.size:
        return False
    # references to b: g's base pointer, the name b, and getrefcount's own argument
    return sys.getrefcount(b) <= 3


def _reduce_to_shape(g, shape: tuple, op: str, i: int):
    """Sum a gradient over the dimensions its input was broadcast along.

    forward broadcast a (3, 1) input to (2, 3, 4), so its gradient arrives as (2, 3, 4): sum the
    leading axis away and axis 2 with keepdims -> (3, 1). Any other mismatch is a bug in the
    op's backward, reported with the op's name.
    """
    if g.shape == tuple(shape):
        return g
    try:
        ok = np.broadcast_shapes(tuple(shape), g.shape) == g.shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{op}.backward returned a gradient of shape {g.shape} for input {i}, "
            f"which has shape {tuple(shape)}"
        )
    lead = g.ndim - len(shape)
    if lead:
        g = g.sum(axis=tuple(range(lead)))
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and g.shape[a] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g
