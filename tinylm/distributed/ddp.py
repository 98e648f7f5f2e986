"""Data parallelism: gradient buckets, and knowing during backward when each one is complete.

Buckets. Each ParamStore group's flat gradient buffer is cut into contiguous ranges of whole
parameters, ~``bucket_mb`` each, taken from the end of the buffer (the last layers' gradients
are finished first in backward). A bucket's collective starts (non-blocking) as soon as every
parameter in it has its whole gradient, and runs while backward continues with earlier layers;
the step waits for all of them once backward is done.

When is a gradient complete? A parameter's gradient is final once every op that consumed it
has run its backward. ``backward_with_hooks`` counts, from the graph before backward starts,
how many input slots of which ops hold each watched parameter, and wraps each such op's
``backward`` (an attribute on that one Function object, gone when the engine clears it):
after the op's own backward, a gradient it *returned* for a parameter is added into the
parameter's ``.grad`` right there (the engine would otherwise hold it until it reaches the
leaf, which its depth-first order places after every earlier layer: no overlap at all), and
the slot is counted off; the last slot makes the parameter ready. A backward that added into
the ``.grad`` itself (``ACCUMULATED``, a Linear's weight) needs nothing more. The same hook
drives MPI's progress (``poke``), which MPICH otherwise makes only inside MPI calls.

The engine (tinylm/tensor.py) is not changed for this; a hook API there (PyTorch's
``register_post_accumulate_grad_hook``) would replace the wrapping.

    buckets of group 0 (decay), bucket_mb small:    [ wte | h.0 ... | h.1 ... | h.2 ... | h.3 ... ]
                                                      b4    b3        b2        b1        b0
    ready in backward:                                b0 (after h.3's ops), b1, b2, b3, b4 (wte: last, it is also the head)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tinylm.tensor import ACCUMULATED, _reduce_to_shape, _topological_order


@dataclass
class Bucket:
    gi: int                  # ParamStore group
    a: int                   # range [a, b) of the group's flat buffer
    b: int
    params: list             # indices (into the group's params) of the parameters inside
    unit: int = -1           # ZeRO-3: the layer (unit) these parameters belong to; -1: the rest
    remaining: int = 0       # parameters not yet complete in this backward
    launched: bool = False
    temp: object = None      # ZeRO-2/3: this bucket's gradient while it is being accumulated
    extra: dict = field(default_factory=dict)


def make_buckets(store, bucket_elems: int) -> list[Bucket]:
    """Contiguous ranges of whole parameters, about ``bucket_elems`` elements each, built from
    the end of each group's buffer; returned in the order backward completes them (roughly)."""
    out = []
    for gi, g in enumerate(store.groups):
        cur, hi = [], g.size
        for i in reversed(range(len(g.params))):
            cur.append(i)
            lo = g.offsets[i]
            if hi - lo >= bucket_elems or i == 0:
                out.append(Bucket(gi, lo, hi, sorted(cur)))
                cur, hi = [], lo
    return out


def backward_with_hooks(loss, params, on_grad, on_ready, poke=None) -> None:
    """``loss.backward()``, telling the caller about each parameter in ``params``:
    ``on_grad(k, g)`` receives a gradient array some op returned for params[k] (the caller
    adds it where it keeps gradients); ``on_ready(k)`` says params[k]'s gradient is complete;
    ``poke()`` runs before each hooked op (to progress communication). Parameters the graph
    does not reach are reported ready after backward."""
    root = loss._graph_node()
    index = {id(p._node): k for k, p in enumerate(params) if p._node is not None}
    remaining = [0] * len(params)
    for node in _topological_order(root):
        ctx = node.ctx
        if ctx is None:
            continue
        slots = [(i, index[id(par)]) for i, par in enumerate(ctx.parents) if id(par) in index]
        if not slots:
            continue
        for _, k in slots:
            remaining[k] += 1
        _wrap(ctx, slots, params, remaining, on_grad, on_ready, poke)
    loss.backward()
    for k in range(len(params)):  # not reached (no path to the loss), or not used at all
        if remaining[k] != -1:
            remaining[k] = -1
            on_ready(k)


def _wrap(ctx, slots, params, remaining, on_grad, on_ready, poke):
    orig = ctx.backward

    def backward(dout):
        if poke is not None:
            poke()
        res = orig(dout)
        single = not isinstance(res, tuple)
        out = [res] if single else list(res)
        for i, k in slots:
            g = out[i]
            if g is not None and g is not ACCUMULATED:
                p = params[k]
                g = _reduce_to_shape(g, p.shape, type(ctx).__name__, i)
                on_grad(k, g if g.dtype == p.dtype else g.astype(p.dtype))
                out[i] = ACCUMULATED
            remaining[k] -= 1
            if remaining[k] == 0:
                remaining[k] = -1  # reported
                on_ready(k)
        return out[0] if single else tuple(out)

    ctx.backward = backward
