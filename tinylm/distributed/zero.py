"""Data-parallel AdamW with ZeRO stages 0-3 over a ParamStore (Rajbhandari et al. 2020).

One class for every stage; what differs is which flat buffers a rank keeps whole and which
only as its own range (tinylm/distributed/shard.py says which range):

    stage  parameters  gradients  AdamW state (moments; fp32 masters when the parameters
                                               are lower precision)
    0      whole       whole      whole     gradients all-reduced per bucket
    1      whole       whole      shard     reduce-scatter per bucket (in place), update the
                                            shard, all-gather the parameters
    2      whole       shard      shard     each bucket's gradient lives only until its
                                            reduce-scatter (every micro-batch, during backward)
    3      shard       shard      shard     each layer's parameters are all-gathered before
                                            its forward and before its backward, freed after

Per rank, bytes per parameter (Psi parameters, N ranks; the paper's Figure 1): with mixed
precision (2-byte parameters and gradients, 12 bytes of fp32 masters and moments) 16, 4 + 12/N,
2 + 14/N, 16/N; in plain fp32 (no masters) 16, 8 + 8/N, 4 + 12/N, 16/N. ``nbytes()`` reads
them off the buffers.

Gradients: every rank's backward gives the mean over its rows; they are summed and divided by
N, so with equal rows per rank the result is the mean over the global batch. With gradient
accumulation, stages 0-1 communicate once, during the last micro-batch's backward; stages 2-3
reduce-scatter every micro-batch and add into the gradient shard (a rank adds its shard into
its own part of the bucket before the reduce-scatter overwrites the shard with the sum).
The global gradient norm is the square root of the all-reduced sums of squares of the shards.

Stage 3 and this engine: an op keeps the arrays its backward needs, a Linear its weight, so
a layer's gathered weights could not be freed after its forward while its ops hold them. So
each layer (each Module in the model's list of blocks) runs as one checkpointed Function: its
forward runs under no_grad between a gather and a release and keeps only its input; its
backward gathers again, recomputes the layer's forward with autograd, backpropagates through
it, releases, and starts the reduce-scatter of that layer's gradient. The cost is one more
forward of every block per step. The parameters outside the blocks (GPT: wte, wpe, ln_f) are
used at both ends of the model (wte is also the head): they are gathered at the model's forward
and released after backward. Outside a step (evaluation, saving) ``full_params()`` gathers
everything.

Checkpoints hold the consolidated state (``state_dict()`` gathers it to rank 0) in the
single-process format, so a run resumes at any number of ranks and any stage.

Leaves out: prefetching the next layer's gather in stage 3; overlapping the parameter all-gather
of stages 1-2 with the next forward; bucket-size tuning.
"""
from __future__ import annotations

import contextlib
import inspect
import math

import numpy as np

import kernels
from tinylm.distributed.ddp import Bucket, backward_with_hooks, make_buckets
from tinylm.distributed.shard import Layout
from tinylm.tensor import Function, Tensor, is_grad_enabled, no_grad


def _placeholder(shape, dtype):
    """What a stage-3 parameter's ``.data`` is while released: the right shape, no memory."""
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


class ZeroOptimizer:
    def __init__(self, store, comm, stage: int = 0, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 bucket_mb: float = 4.0, model=None, master_dtype=np.float32, overlap: bool = True):
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"zero must be 0, 1, 2 or 3, got {stage}")
        if stage == 3 and model is None:
            raise ValueError("zero=3 needs the model (its layers are gathered one at a time)")
        self.store, self.comm, self.stage = store, comm, stage
        self.overlap = overlap  # False: every bucket starts after backward (benchmarks/distributed.py)
        self.lr, self.betas, self.eps = float(lr), tuple(betas), float(eps)
        self.step_count = 0
        self.world = comm.size
        shard_world = self.world if stage >= 1 else 1
        shard_rank = comm.rank if stage >= 1 else 0
        self.layouts = [Layout(g.size, shard_world, shard_rank) for g in store.groups]
        self.split_layouts = [Layout(g.size, self.world, comm.rank) for g in store.groups]
        self.params = [p for g in store.groups for p in g.params]
        self.sizes = [g.size for g in store.groups]  # (stage 3 releases the whole buffers)
        self.where = [(gi, i) for gi, g in enumerate(store.groups) for i in range(len(g.params))]
        self.pending: list = []
        self.finished = True
        self.model = model
        self.rng = getattr(model, "dropout_rng", None)
        # ---- AdamW state over this rank's range ------------------------------------------------
        self.m, self.v, self.master = [], [], []
        for g, L in zip(store.groups, self.layouts):
            low = np.dtype(g.p.dtype).itemsize < np.dtype(master_dtype).itemsize
            sdt = np.dtype(master_dtype) if low else g.p.dtype
            self.m.append(np.zeros(L.size, dtype=sdt))
            self.v.append(np.zeros(L.size, dtype=sdt))
            lo, hi = L.owned()
            if low:
                mst = np.zeros(L.size, dtype=sdt)
                mst[: hi - lo] = g.p[lo:hi]
                self.master.append(mst)
            else:
                self.master.append(None)
        # ---- gradients ---------------------------------------------------------------------------
        self.shard_g = None
        if stage >= 2:
            self.shard_g = [np.zeros(L.size, dtype=g.p.dtype) for g, L in zip(store.groups, self.layouts)]
            for g in store.groups:
                g.g, g.gviews = None, []  # the whole gradient buffer is released (views first)
                for p in g.params:
                    p.grad = None
        # ---- buckets (stages 0-2) or layers (stage 3) -------------------------------------------
        elems = max(1, int(bucket_mb * 2**20 / store.groups[0].p.dtype.itemsize))
        self.shard_p = None
        if stage <= 2:
            self.buckets = make_buckets(store, elems)
        else:
            self.buckets = self._unit_segments(model)
            self.shard_p = []
            for g, L in zip(store.groups, self.layouts):
                lo, hi = L.owned()
                sp = np.zeros(L.size, dtype=g.p.dtype)
                sp[: hi - lo] = g.p[lo:hi]
                self.shard_p.append(sp)
                g.p = None  # the whole parameter buffer is released
            for p in self.params:
                p.data = _placeholder(p.shape, p.dtype)
            self.gathered: set[int] = set()
            self.full = False
            self._wrap_model(model)
        self.bucket_of = {}
        for bi, bk in enumerate(self.buckets):
            for i in bk.params:
                self.bucket_of[(bk.gi, i)] = bi
        self.order = self._launch_order(model)
        self.cursor = 0

    # ---- sizes ----------------------------------------------------------------------------------
    def nbytes(self) -> dict:
        """Bytes this rank keeps between steps: parameters, gradients, optimizer state."""
        if self.stage <= 2:
            params = sum(g.p.nbytes for g in self.store.groups)
        else:
            params = sum(a.nbytes for a in self.shard_p)
        if self.stage <= 1:
            grads = sum(g.g.nbytes for g in self.store.groups)
        else:
            grads = sum(a.nbytes for a in self.shard_g)
        opt = sum(a.nbytes for a in self.m) + sum(a.nbytes for a in self.v) + \
            sum(a.nbytes for a in self.master if a is not None)
        return {"params": params, "grads": grads, "optimizer": opt, "total": params + grads + opt}

    # ---- backward ---------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self._finish()
        if self.stage <= 1:
            self.store.zero_grad()
        else:
            for a in self.shard_g:
                a.fill(0)
            for p in self.params:
                p.grad = None
        self.finished = False
        for bk in self.buckets:
            bk.launched, bk.temp = False, None

    def backward(self, loss, last: bool = True) -> None:
        """Backward of one micro-batch (``loss`` None: this rank's micro-batch trained nothing;
        it still joins the collectives). ``last``: the step's last micro-batch."""
        if self.stage <= 1 and not last:
            if loss is not None:
                loss.backward()
            return
        for bk in self.buckets:
            bk.launched = False
            bk.remaining = len(bk.params)
        self.cursor = 0
        if loss is not None:
            if self.stage == 3:
                loss.backward()
            else:
                backward_with_hooks(loss, self.params, self._on_grad, self._on_ready, self._poke)
        for bk in self.buckets:  # whatever backward did not reach: now (zeros if nothing)
            bk.remaining = 0
        self._launch_ready(force=True)
        if self.stage == 3:
            self._release(-1)

    def _poke(self):
        self.pending = self.comm.poke(self.pending)

    def _grad_view(self, gi, i):
        g = self.store.groups[gi]
        p = g.params[i]
        if self.stage <= 1:
            return g.gviews[i]
        bk = self.buckets[self.bucket_of[(gi, i)]]
        if bk.temp is None:
            self._alloc_temp(bk)
        return p.grad

    def _alloc_temp(self, bk: Bucket):
        g = self.store.groups[bk.gi]
        dtype = self.shard_g[bk.gi].dtype
        bk.temp = np.zeros(bk.b - bk.a, dtype=dtype)
        for i in bk.params:
            p, off = g.params[i], g.offsets[i] - bk.a
            p.grad = bk.temp[off: off + p.size].reshape(p.shape)

    def _on_grad(self, k, grad):
        gi, i = self.where[k]
        view = self._grad_view(gi, i)
        p = self.params[k]
        if p.grad is not view:  # user code replaced .grad: bring it back to the buffer
            p.grad = view
        view += grad

    def _on_ready(self, k):
        gi, i = self.where[k]
        bi = self.bucket_of[(gi, i)]
        bk = self.buckets[bi]
        bk.remaining -= 1
        if bk.remaining == 0:
            self._launch_ready()

    def _launch_order(self, model) -> list[int]:
        """The one order in which every rank starts the buckets' collectives. MPI matches
        collectives on a communicator by the order they are called, so a rank whose backward
        completes buckets in another order (a different graph: a skipped micro-batch, an extra
        term in one rank's loss) must still start them in this order, or the ranks hang or mix
        up buckets. Stages 0-2: by where the bucket's first parameter sits in the model (the
        later, the sooner backward completes it); stage 3: by layer, last layer first, then
        the parameters outside the layers."""
        n = len(self.buckets)
        if self.stage == 3:
            return sorted(range(n), key=lambda bi: (1, 0) if self.buckets[bi].unit < 0 else (0, -self.buckets[bi].unit))
        if model is None:
            return list(range(n))
        pos = {id(p): k for k, p in enumerate(model.parameters())}
        first = [min(pos.get(id(self.store.groups[bk.gi].params[i]), -1) for i in bk.params) for bk in self.buckets]
        return sorted(range(n), key=lambda bi: -first[bi])

    def _launch_ready(self, force: bool = False) -> None:
        """Start, in ``self.order``, every bucket that is complete and not preceded by an
        incomplete one (``overlap`` off: only when ``force``d, after backward)."""
        if not (self.overlap or force):
            return
        while self.cursor < len(self.order):
            bi = self.order[self.cursor]
            bk = self.buckets[bi]
            if bk.remaining > 0:
                return
            if not bk.launched:
                self._launch(bi)
            self.cursor += 1

    def _launch(self, bi):
        """Start bucket ``bi``'s collective."""
        bk = self.buckets[bi]
        bk.launched = True
        gi, a, b = bk.gi, bk.a, bk.b
        L = self.split_layouts[gi]
        what = f"gradient bucket {bi} (group {gi}, elements {a}-{b})"
        if self.stage == 0:
            self.pending.append(self.comm.iallreduce(self.store.groups[gi].g[a:b], what))
        elif self.stage == 1:
            # into a temporary of this rank's part, then back into the whole buffer. (MPI_IN_PLACE
            # would need none, but MPICH 5.0.2 asserts on it for large buckets: "memcpy argument
            # memory ranges overlap", measured at 27 MB.)
            buf = self.store.groups[gi].g[a:b]
            counts, _ = L.split(a, b)
            d0, _, cnt = L.mine(a, b)
            part = np.empty(cnt, dtype=buf.dtype)
            h = self.comm.ireduce_scatter(buf, part, counts, what)
            h.then = lambda buf=buf, part=part, d0=d0: buf.__setitem__(slice(d0, d0 + part.size), part)
            self.pending.append(h)
        else:
            if bk.temp is None:
                self._alloc_temp(bk)
            temp = bk.temp
            counts, _ = L.split(a, b)
            d0, s0, cnt = L.mine(a, b)
            shard = self.shard_g[gi]
            prev = bk.extra.pop("handle", None)
            if prev is not None and any(h is prev for h in self.pending):
                self.comm.wait([prev])  # the last micro-batch's sum must have landed in the shard
                self.pending = [h for h in self.pending if h is not prev]
            if cnt:
                temp[d0: d0 + cnt] += shard[s0: s0 + cnt]  # accumulation: the shard's sum so far
            h = self.comm.ireduce_scatter(temp, shard[s0: s0 + cnt], counts, what)
            bk.extra["handle"] = h
            self.pending.append(h)
            g = self.store.groups[gi]
            for i in bk.params:
                g.params[i].grad = None  # the temp lives on in the handle until it completes
            bk.temp = None
        self._poke()

    def _finish(self):
        """Wait for every gradient collective and divide by the number of ranks (once a step)."""
        if self.finished:
            return
        self.comm.wait(self.pending)
        self.pending = []
        inv = 1.0 / self.world
        for gi, g in enumerate(self.store.groups):
            lo, hi = self.layouts[gi].owned()
            if self.stage <= 1:
                g.g[lo:hi] *= g.g.dtype.type(inv)
            else:
                self.shard_g[gi][: hi - lo] *= self.shard_g[gi].dtype.type(inv)
        self.finished = True

    # ---- norm, clipping, update -------------------------------------------------------------------
    def _own(self, gi):
        """(parameters, gradients) of this rank's range of group gi, as views."""
        g, L = self.store.groups[gi], self.layouts[gi]
        lo, hi = L.owned()
        p = g.p[lo:hi] if self.stage <= 2 else self.shard_p[gi][: hi - lo]
        gr = g.g[lo:hi] if self.stage <= 1 else self.shard_g[gi][: hi - lo]
        return p, gr

    def grad_norm(self) -> float:
        self._finish()
        sq = [float(kernels.get("sumsq", gr)(gr)) if gr.size else 0.0 for gr in (self._own(i)[1] for i in
                                                                                  range(len(self.layouts)))]
        total = sum(sq)
        if self.stage >= 1:
            total = float(self.comm.allreduce([total], "gradient norm")[0])
        return math.sqrt(total)

    def clip_grad_norm(self, max_norm: float) -> float:
        norm = self.grad_norm()
        if max_norm > 0 and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for gi in range(len(self.layouts)):
                gr = self._own(gi)[1]
                gr *= gr.dtype.type(scale)
        return norm

    def step(self, lr: float | None = None) -> None:
        self._finish()
        self.step_count += 1
        lr = self.lr if lr is None else float(lr)
        b1, b2 = self.betas
        for gi, g in enumerate(self.store.groups):
            p, gr = self._own(gi)
            n = p.size
            if n == 0:
                continue
            m, v, mst = self.m[gi][:n], self.v[gi][:n], self.master[gi]
            if mst is None:
                kernels.get("adamw_update", p)(p, gr, m, v, lr, b1, b2, self.eps, g.weight_decay, self.step_count)
            else:
                w = mst[:n]
                kernels.get("adamw_update", w)(w, gr.astype(w.dtype), m, v, lr, b1, b2, self.eps, g.weight_decay,
                                               self.step_count)
                p[...] = w
        if self.stage in (1, 2):
            hs = []
            for gi, g in enumerate(self.store.groups):
                counts, displs = self.split_layouts[gi].split(0, self.sizes[gi])
                hs.append(self.comm.iallgather_inplace(g.p, counts, displs, f"parameter all-gather (group {gi})"))
            self.comm.wait(hs)

    # ---- state for checkpoints: consolidated, the single-process AdamW's format ---------------
    def _gather_full(self, gi, buf):
        """This rank's range of ``buf`` (a shard-sized array) gathered to rank 0 as the whole
        group (None on other ranks)."""
        n, L = self.sizes[gi], self.layouts[gi]
        lo, hi = L.owned()
        if self.stage == 0:
            return np.array(buf[:n])
        counts, displs = self.split_layouts[gi].split(0, n)
        full = np.empty(n, dtype=buf.dtype) if self.comm.rank == 0 else None
        self.comm.wait([self.comm.igather(np.ascontiguousarray(buf[: hi - lo]), full, counts, displs, 0,
                                          f"checkpoint gather (group {gi})")])
        return full

    def state_dict(self) -> dict:
        """Every rank calls it; rank 0 gets the whole state (others a partial dict)."""
        out = {"step": np.array([self.step_count], dtype=np.int64)}
        for gi in range(len(self.layouts)):
            for key, bufs in (("m", self.m), ("v", self.v), ("master", self.master)):
                if bufs[gi] is None:
                    continue
                full = self._gather_full(gi, bufs[gi])
                if full is not None:
                    out[f"group{gi}.{key}"] = full
        return out

    def load_state_dict(self, state: dict) -> None:
        for gi, g in enumerate(self.store.groups):
            lo, hi = self.layouts[gi].owned()
            for key, bufs in (("m", self.m), ("v", self.v), ("master", self.master)):
                if bufs[gi] is None:
                    continue
                name = f"group{gi}.{key}"
                if name not in state:
                    if key == "master":  # a checkpoint without masters: start them from the weights
                        bufs[gi][: hi - lo] = self._own(gi)[0]
                        continue
                    raise KeyError(f"optimizer state lacks {name!r}")
                a = np.asarray(state[name]).reshape(-1) if np.ndim(state[name]) else np.asarray(state[name])
                if a.shape != (self.sizes[gi],):
                    raise ValueError(f"optimizer state {name} has shape {a.shape}, expected ({self.sizes[gi]},)")
                bufs[gi][: hi - lo] = a[lo:hi]
        if "step" not in state:
            raise KeyError("optimizer state lacks 'step'")
        self.step_count = int(np.asarray(state["step"]).reshape(-1)[0])

    # ---- whole weights on demand --------------------------------------------------------------------
    @contextlib.contextmanager
    def full_params(self, writeback: bool = False):
        """Inside, every parameter is whole on every rank (stage 3 gathers them; other stages
        have them already). ``writeback``: copy this rank's range back into its shard after
        (for loading weights)."""
        if self.stage < 3 or self.full:
            yield
            return
        fulls = self._gather_all()
        try:
            yield
        finally:
            self.full = False
            for gi, g in enumerate(self.store.groups):
                if writeback:
                    lo, hi = self.layouts[gi].owned()
                    self.shard_p[gi][: hi - lo] = fulls[gi][lo:hi]
                for p in g.params:
                    p.data = _placeholder(p.shape, p.dtype)
            self.gathered.clear()

    def _gather_all(self) -> list:
        """Every group whole on every rank (stage 3); parameters pointed at it."""
        fulls = []
        for gi, g in enumerate(self.store.groups):
            buf = np.empty(self.sizes[gi], dtype=self.shard_p[gi].dtype)
            counts, displs = self.split_layouts[gi].split(0, self.sizes[gi])
            lo, hi = self.layouts[gi].owned()
            self.comm.wait([self.comm.iallgather(self.shard_p[gi][: hi - lo], buf, counts, displs,
                                                 f"parameter all-gather (group {gi})")])
            for p, off in zip(g.params, g.offsets):
                p.data = buf[off: off + p.size].reshape(p.shape)
            fulls.append(buf)
        self.full = True
        return fulls

    def load_weights(self, model, arrays: dict, path) -> None:
        from tinylm.train.checkpoint import load_weights  # noqa: PLC0415

        with self.full_params(writeback=True):
            load_weights(model, arrays, path)

    def materialize(self) -> None:
        """Stage 3 after training: gather the weights for good (sampling, export) and undo the
        layer wrapping. Other stages: nothing to do."""
        if self.stage < 3:
            return
        self._gather_all()
        for unit in self.units:
            unit.__dict__.pop("forward", None)
        self.model.__dict__.pop("forward", None)

    # ---- stage 3: layers as units -----------------------------------------------------------------
    def _unit_segments(self, model) -> list[Bucket]:
        """Each block of the model (the Modules in its first list attribute) is a unit; the other
        parameters are unit -1. Per group, each maximal run of one unit's consecutive parameters
        is a segment (a Bucket)."""
        from tinylm.nn import Module  # noqa: PLC0415

        self.units = []
        for value in vars(model).values():
            if isinstance(value, list) and value and all(isinstance(v, Module) for v in value):
                self.units = list(value)
                break
        owner = {}
        for u, mod in enumerate(self.units):
            for p in mod.parameters():
                owner[id(p)] = u
        segs = []
        for gi, g in enumerate(self.store.groups):
            start = 0
            for i in range(1, len(g.params) + 1):
                if i == len(g.params) or owner.get(id(g.params[i]), -1) != owner.get(id(g.params[start]), -1):
                    end = g.offsets[i] if i < len(g.params) else self.sizes[gi]
                    segs.append(Bucket(gi, g.offsets[start], end, list(range(start, i)),
                                       owner.get(id(g.params[start]), -1)))
                    start = i
        return segs

    def _gather(self, unit):
        if self.full or unit in self.gathered:
            return
        hs = []
        for bk in self.buckets:
            if bk.unit != unit:
                continue
            g, L = self.store.groups[bk.gi], self.split_layouts[bk.gi]
            buf = np.empty(bk.b - bk.a, dtype=self.shard_p[bk.gi].dtype)
            counts, displs = L.split(bk.a, bk.b)
            _, s0, cnt = L.mine(bk.a, bk.b)
            hs.append(self.comm.iallgather(self.shard_p[bk.gi][s0: s0 + cnt], buf, counts, displs,
                                           f"parameter all-gather (layer {unit})"))
            for i in bk.params:
                p, off = g.params[i], g.offsets[i] - bk.a
                p.data = buf[off: off + p.size].reshape(p.shape)
        self.comm.wait(hs)
        self.gathered.add(unit)

    def _release(self, unit):
        if self.full or unit not in self.gathered:
            return
        for bk in self.buckets:
            if bk.unit == unit:
                g = self.store.groups[bk.gi]
                for i in bk.params:
                    g.params[i].data = _placeholder(g.params[i].shape, g.params[i].dtype)
        self.gathered.discard(unit)

    def _unit_grads(self, unit):
        for bk in self.buckets:
            if bk.unit == unit and bk.temp is None:
                self._alloc_temp(bk)

    def _launch_unit(self, unit):
        for bk in self.buckets:
            if bk.unit == unit:
                bk.remaining = 0
        self._launch_ready(force=True)

    def _wrap_model(self, model):
        opt = self
        orig_model_forward = model.forward

        def model_forward(*args, **kwargs):
            opt._gather(-1)
            if is_grad_enabled() and not opt.full:
                opt._unit_grads(-1)  # the rest's gradients go straight into their buckets
            try:
                return orig_model_forward(*args, **kwargs)
            finally:
                if not is_grad_enabled():
                    opt._release(-1)

        model.forward = model_forward
        for u, block in enumerate(self.units):
            block.forward = self._block_forward(u, block.forward)

    def _block_forward(self, unit, orig):
        opt = self

        try:  # where the block's forward takes a KV cache (generation runs without checkpointing)
            cache_at = list(inspect.signature(orig).parameters).index("cache") - 1
        except ValueError:
            cache_at = None

        def forward(x, *args, **kwargs):
            if opt.full:
                return orig(x, *args, **kwargs)
            cache = kwargs.get("cache", args[cache_at] if cache_at is not None and len(args) > cache_at else None)
            if not is_grad_enabled() or cache is not None:
                opt._gather(unit)
                try:
                    return orig(x, *args, **kwargs)
                finally:
                    opt._release(unit)
            return _Layer.apply(x, run=lambda t: orig(t, *args, **kwargs), opt=opt, unit=unit)

        return forward


class _Layer(Function):
    """One ZeRO-3 layer, checkpointed: forward under no_grad between a gather and a release;
    backward gathers, recomputes with autograd, backpropagates, releases, reduce-scatters."""

    def forward(self, x, run, opt, unit):  # (B, T, C) -> (B, T, C)
        self.x, self.run, self.opt, self.unit = x, run, opt, unit
        self.rng_state = None if opt.rng is None else opt.rng.bit_generator.state
        opt._gather(unit)
        try:
            with no_grad():
                out = run(Tensor(x)).data
        finally:
            opt._release(unit)
        return out

    def backward(self, dout):
        opt, unit = self.opt, self.unit
        opt._poke()
        opt._gather(unit)
        opt._unit_grads(unit)
        xt = Tensor(self.x, requires_grad=True)
        now = None
        if self.rng_state is not None:  # the same dropout masks as the forward drew
            now = opt.rng.bit_generator.state
            opt.rng.bit_generator.state = self.rng_state
        out = self.run(xt)
        if now is not None:
            opt.rng.bit_generator.state = now
        out.backward(dout)
        opt._release(unit)
        opt._launch_unit(unit)
        return xt.grad
