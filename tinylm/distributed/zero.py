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

Mixed precision (``set_format``, tinylm/amp/policy.py; the training loop calls it for dtype
bf16/fp16). The parameters are float32 arrays holding values of the format (the working copy;
one process's store keeps it as 16-bit storage, tinylm/optim/store.py, and the activations are
16-bit here as there: the training loop's autocast) and the fp32 masters are a separate
buffer, here sharded like the moments:
each rank keeps the masters of its own range only (none whole anywhere, so stages 1-3 keep
their 4 + 12/N, 2 + 14/N, 16/N), updates them, rounds them into its range of the working copy,
and the all-gather spreads that. Gradients are reduced in fp32 and rounded to the format after
the reduction, on each rank's own range: the engine's gradients are fp32 arrays in any case,
and rounding does not commute with a sum, so only rounding the reduced gradient (as one process
rounds its whole-batch gradient) makes N ranks compute what one does; a 16-bit reduction would
halve the bytes sent (what DeepSpeed and FSDP's reduce_dtype do) and give up that equality.
The fp16 overflow check is global: one all-reduce carries each rank's sum of squares and its
found-inf flag, so every rank takes the same decision (step, or skip and halve the scale).
Without masters (bf16, stochastic rounding) each rank rounds its range with the stream
position of the whole buffer, so the rounding is the single process's.

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
from tinylm.tensor import Function, Tensor, autocast, autocast_format, is_grad_enabled, no_grad


def _round(x, fmt, out, seed=None):
    from kernels._formats import round_to_format  # noqa: PLC0415 (Numba: only a 16-bit run needs it)

    return round_to_format(x, fmt, out=out, seed=seed)


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
        self.fmt, self.sr_seed = "fp32", 0  # [amp #13] set_format: the working copy's format
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
                kernels.get("adamw_update", w)(w, gr if gr.dtype == w.dtype else gr.astype(w.dtype), m, v, lr, b1,
                                               b2, self.eps, g.weight_decay, self.step_count)
                if self.fmt == "fp32":
                    p[...] = w  # lower-precision parameter storage: the cast rounds
                else:
                    _round(w, self.fmt, out=p)  # [amp #13] the working copy of this rank's range
        if self.fmt == "bf16" and self.master[0] is None:
            self._round_stochastic(self.step_count)  # [amp #13] bf16 without masters
        self._allgather_params()

    def _allgather_params(self) -> None:
        """Stages 1-2: every rank's updated range of the parameters to every rank."""
        if self.stage not in (1, 2):
            return
        hs = []
        for gi, g in enumerate(self.store.groups):
            counts, displs = self.split_layouts[gi].split(0, self.sizes[gi])
            hs.append(self.comm.iallgather_inplace(g.p, counts, displs, f"parameter all-gather (group {gi})"))
        self.comm.wait(hs)

    # ---- mixed precision over ranks [amp #13] --------------------------------------------------
    def set_format(self, fmt: str, master: bool = True, seed: int = 0) -> None:
        """Hold the weights in ``fmt`` (ParamStore.set_format's contract, sharded): with
        ``master``, fp32 masters of this rank's range start from the weights and the working
        copy is their rounding; without (bf16 only), the weights are rounded to bf16 and updated
        with stochastic rounding from a stream seeded by ``seed`` and the step. Every rank calls
        it (stages 1-2 all-gather the rounded weights)."""
        if fmt not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"unknown format {fmt!r}: expected fp32, bf16 or fp16")
        if fmt == "fp32":
            return
        if any(np.dtype(self._own(gi)[0].dtype) != np.float32 for gi in range(len(self.layouts))):
            raise TypeError("mixed precision needs float32 parameters")
        if not master and fmt != "bf16":
            raise ValueError("weights without a master copy are for bf16 only (stochastic rounding)")
        self.fmt, self.sr_seed = fmt, int(seed)
        for gi, L in enumerate(self.layouts):
            if master:
                lo, hi = L.owned()
                mst = np.zeros(L.size, dtype=np.float32)
                mst[: hi - lo] = self._own(gi)[0]
                self.master[gi] = mst
            else:
                self.master[gi] = None
        self._refresh()

    def _refresh(self) -> None:
        """The working copy from the masters (round to nearest even), or without masters the
        weights rounded in place; then whole again on every rank (stages 1-2)."""
        if self.fmt == "fp32":
            return
        for gi in range(len(self.layouts)):
            p = self._own(gi)[0]
            mst = self.master[gi]
            _round(p if mst is None else mst[: p.size], self.fmt, out=p)
        self._allgather_params()

    def _round_stochastic(self, step: int) -> None:
        """bf16 without masters, after AdamW's fp32 update of this rank's range: round it to
        bf16 stochastically with ParamStore.after_update's seed, at the positions it has in the
        whole buffer (the random stream is indexed from the buffer's start)."""
        for gi, g in enumerate(self.store.groups):
            seed = (self.sr_seed * 1_000_003 + step * 7919 + gi) & 0xFFFFFFFF
            if self.stage <= 2:  # the rest of g.p holds bf16 values, which the rounding leaves as they are
                _round(g.p, "bf16", out=g.p, seed=seed)
            else:  # stage 3 holds only its range: a temporary from the buffer's start to its end
                lo, hi = self.layouts[gi].owned()
                tmp = np.zeros(hi, dtype=np.float32)
                tmp[lo:hi] = self.shard_p[gi][: hi - lo]
                _round(tmp, "bf16", out=tmp, seed=seed)
                self.shard_p[gi][: hi - lo] = tmp[lo:hi]

    def round_grads(self) -> None:
        """The reduced gradients of this rank's range rounded to the format, as 16-bit gradient
        storage would hold them (fp16: beyond 65504 -> inf)."""
        self._finish()
        if self.fmt == "fp32":
            return
        for gi in range(len(self.layouts)):
            gr = self._own(gi)[1]
            _round(gr, self.fmt, out=gr)

    def unscale_clip(self, inv_scale: float, max_norm: float) -> tuple[float, bool]:
        """ParamStore.unscale_clip over ranks: the gradients times ``inv_scale``, clipped to
        ``max_norm``; (norm, every gradient on every rank finite). One all-reduce carries the
        sums of squares and the found-inf flags, so all ranks agree on skipping a step."""
        self._finish()
        sq = 0.0
        for gi in range(len(self.layouts)):
            gr = self._own(gi)[1]
            if gr.size:
                sq += float(kernels.get("sumsq", gr)(gr))
        found_inf = 0.0 if math.isfinite(sq) else 1.0
        # stage 0: every rank holds the whole reduced gradient, so its sum is already global
        tot = self.comm.allreduce([sq if self.stage >= 1 else 0.0, found_inf], "gradient norm and found-inf flag")
        if self.stage >= 1:
            sq = float(tot[0])
        norm = math.sqrt(sq) * inv_scale if tot[1] == 0 else float("inf")
        if not math.isfinite(norm):
            return norm, False
        factor = inv_scale
        if max_norm > 0 and norm > max_norm:
            factor *= max_norm / (norm + 1e-6)
        if factor != 1.0:
            for gi in range(len(self.layouts)):
                gr = self._own(gi)[1]
                gr *= gr.dtype.type(factor)
        return norm, True

    @contextlib.contextmanager
    def masters_as_weights(self, state: dict):
        """On the rank holding ``state`` (a state_dict gathered to it): inside, the parameters
        hold the fp32 masters, so a checkpoint's model weights are full precision as in one
        process; after, the working copy again."""
        keep = []
        try:
            if self.fmt != "fp32":
                for gi, g in enumerate(self.store.groups):
                    full = state.get(f"group{gi}.master")
                    if full is None:
                        continue
                    for p, off in zip(g.params, g.offsets):
                        keep.append((p, p.data.copy()))
                        p.data[...] = full[off: off + p.size].reshape(p.shape)
            yield
        finally:
            for p, old in keep:
                p.data[...] = old

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
        self._refresh()  # [amp #13] the working copy from the restored masters

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
    backward gathers, recomputes with autograd, backpropagates, releases, reduce-scatters.
    [amp #13] Under autocast the layer's output is stored in the format (the block's own output
    is), its input kept 16-bit, and the recompute runs under the same autocast as the forward."""

    lowp = "activation"
    saved_lowp = ("x",)

    def forward(self, x, run, opt, unit):  # (B, T, C) -> (B, T, C)
        self.x, self.run, self.opt, self.unit = x, run, opt, unit
        self.rng_state = None if opt.rng is None else opt.rng.bit_generator.state
        self.fmt = autocast_format()
        opt._gather(unit)
        try:
            with no_grad():
                out = run(Tensor(x)).values()
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
        with autocast(self.fmt):
            out = self.run(xt)
        if now is not None:
            opt.rng.bit_generator.state = now
        out.backward(dout)
        opt._release(unit)
        opt._launch_unit(unit)
        return xt.grad
