"""A small data-parallel run that prints what tests and benchmarks compare.

    mpiexec -n 2 python -m tinylm.distributed.selftest --zero 2 --out DIR [--steps 20 ...]
    python -m tinylm.distributed.selftest --zero 0 --out DIR          (one process: the reference)

A tiny GPT on seeded random tokens, trained by tinylm.train.loop.Trainer with the global batch
split over the ranks (BatchSampler's rank slice). Rank 0 writes ``DIR/result.json`` (losses,
gradient norms, per-rank buffer bytes, peak RSS of every rank, tokens/s) and ``DIR/weights.npy``
(every parameter, flattened in name order, float64; NumPy's format without pickle).

Mixed precision (``--amp bf16|fp16``, a float32 model): ``DIR/masters.npy`` holds the fp32
masters in the same order (``weights.npy`` is then the working copy), and result.json each
rank's loss-scaler state and checksums of its weights, which must agree on every rank.
``--overflow-at S --overflow-rank R`` makes rank R's gradient of one element (wte[0, 0], in
rank 0's shard) non-finite in fp16 at step S: a term whose value is exactly 0 and whose
gradient is 1e30, added to that rank's loss.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def _cfg(a):
    return SimpleNamespace(lr=a.lr, min_lr=a.lr / 10, warmup_steps=2, max_steps=a.steps, grad_accum=a.accum,
                           grad_clip=a.clip, weight_decay=0.1, beta1=0.9, beta2=0.95, eval_interval=a.save_every,
                           log_interval=1, time_budget=0.0, progress=False, keep_checkpoints=1,
                           save_on_interrupt=False, bucket_mb=a.bucket_mb, seed=7, dtype=a.amp,
                           master_weights=not a.no_master, loss_scale_init=a.loss_scale_init,
                           loss_scale_window=a.loss_scale_window, loss_scale_min=1.0)


def _flat(model) -> np.ndarray:
    return np.concatenate([p.data.astype(np.float64).reshape(-1) for _, p in sorted(model.named_parameters())])


def _poison(model):
    """0 in value, a gradient of 1e30 for wte[0, 0] (fp16 overflow at any loss scale >= 1)."""
    from tinylm.tensor import Tensor  # noqa: PLC0415

    w = model.wte.weight
    sel = np.zeros(w.shape, dtype=w.dtype)
    sel.reshape(-1)[0] = 1
    picked = (w * Tensor(sel)).sum()
    return (picked - Tensor(np.array(picked.data))) * 1e30


class _NoTok:
    def save(self, path):
        Path(path).write_text("{}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) at this step")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=6)
    ap.add_argument("--clip", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--embd", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--bucket-mb", type=float, default=0.01)
    ap.add_argument("--save-every", type=int, default=10**9)
    ap.add_argument("--die-at", type=int, default=None, help="rank 1 kills itself at this step (fault test)")
    ap.add_argument("--raise-at", type=int, default=None, help="rank 1 raises at this step (fault test)")
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("--no-overlap", action="store_true", help="start every bucket's reduction after backward")
    ap.add_argument("--amp", default="fp32", choices=("fp32", "bf16", "fp16"), help="mixed precision (--dtype float32)")
    ap.add_argument("--no-master", action="store_true", help="bf16 without fp32 masters (stochastic rounding)")
    ap.add_argument("--loss-scale-init", type=float, default=2.0 ** 16)
    ap.add_argument("--loss-scale-window", type=int, default=2000)
    ap.add_argument("--overflow-at", type=int, default=None, help="fp16: a forced overflow at this step ...")
    ap.add_argument("--overflow-rank", type=int, default=0, help="... on this rank only")
    a = ap.parse_args(argv)

    from tinylm.distributed import world  # noqa: PLC0415 (sets threads per rank before kernels load)

    comm = world(timeout=a.timeout)
    from tinylm.models import GPT, GPTConfig  # noqa: PLC0415
    from tinylm.train.checkpoint import load_checkpoint  # noqa: PLC0415
    from tinylm.train.loop import Trainer  # noqa: PLC0415
    from tinylm.train.objectives import NextToken  # noqa: PLC0415
    from tinylm.train.pretrain import BatchSampler  # noqa: PLC0415

    rank, size = (0, 1) if comm is None else (comm.rank, comm.size)
    if a.global_batch % size:
        raise SystemExit(f"global batch {a.global_batch} does not split over {size} ranks")
    out = Path(a.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if comm is not None:
        comm.barrier()
    tokens = np.random.default_rng(0).integers(0, a.vocab, 5000)
    model = GPT(GPTConfig(n_layer=a.layers, n_head=a.heads, n_embd=a.embd, block_size=a.block, vocab_size=a.vocab,
                          dtype=a.dtype), seed=1)
    sampler = BatchSampler(tokens, a.global_batch // size, a.block, seed=2, rank=rank, world=size)

    class Objective(NextToken):
        def loss(self, model, batch):
            if a.die_at is not None and rank == 1 and trainer.step == a.die_at:
                import os  # noqa: PLC0415
                import signal  # noqa: PLC0415

                os.kill(os.getpid(), signal.SIGKILL)
            if a.raise_at is not None and rank == 1 and trainer.step == a.raise_at:
                raise RuntimeError("a failure on rank 1 (fault test)")
            loss, metrics = super().loss(model, batch)
            if a.overflow_at is not None and rank == a.overflow_rank and trainer.step == a.overflow_at:
                loss = loss + _poison(model)
            return loss, metrics

    trainer = Trainer(model, Objective(), sampler, _cfg(a), out, _NoTok(), meta=lambda: {"train_config": {}},
                      comm=comm, zero=a.zero)
    if a.no_overlap:
        trainer.opt.overlap = False
    if a.resume:
        trainer.restore(load_checkpoint(out / "checkpoint"))
    t0 = time.perf_counter()
    summary = trainer.run(stop_at=a.stop_at)
    elapsed = time.perf_counter() - t0
    nbytes = trainer.opt.nbytes() if hasattr(trainer.opt, "nbytes") else {}
    if comm is not None:
        trainer.opt.materialize()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss_all = [rss] if comm is None else [int(x) for x in comm.allreduce(
        [rss if r == rank else 0 for r in range(size)], "rss")]
    w = _flat(model)
    # every rank's view: its whole weights (checksums) and its loss scaler, which must all agree
    sc = trainer.scaler
    mine = [float(w.sum()), float(np.dot(w, np.linspace(-1.0, 1.0, w.size))),
            0.0 if sc is None else sc.scale, 0.0 if sc is None else float(sc.skipped)]
    views = [mine] if comm is None else comm.allreduce(
        [x if r == rank else 0.0 for r in range(size) for x in mine], "per-rank views").reshape(size, -1).tolist()
    masters = None
    if trainer.policy.has_master:  # the fp32 masters, gathered
        if comm is None:
            with trainer.store.masters_in_params():
                masters = _flat(model)
        else:
            state = trainer.opt.state_dict()
            if rank == 0:
                with trainer.opt.masters_as_weights(state):
                    masters = _flat(model)
    if rank == 0:
        np.save(out / "weights.npy", w, allow_pickle=False)
        if masters is not None:
            np.save(out / "masters.npy", masters, allow_pickle=False)
        res = {"losses": summary["train_losses"], "steps": summary["steps"], "ranks": size, "zero": a.zero,
               "nbytes": nbytes, "n_params": int(w.size), "peak_rss": rss_all, "elapsed_s": elapsed,
               "tokens_per_s": summary["tokens_per_s"], "rank_views": views,
               "scaler": None if sc is None else sc.state()}
        (out / "result.json").write_text(json.dumps(res))
    if comm is not None:
        comm.barrier()
        comm.done()


if __name__ == "__main__":
    main()
