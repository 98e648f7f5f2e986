"""``tinylm sft``, ``dpo`` and ``grpo`` on several ranks (``--nproc N``, or under ``mpiexec -n N``).

The same stage as tinylm/posttrain/stage.py's ``run`` (its settings, checks, model preparation,
data readers, curves and held-out scoring are called from there), with what several ranks
change:

- ``batch_size`` is per rank, as in ``tinylm train``: each step's global batch of N x batch_size
  rows (SFT) or pairs (DPO) is drawn by the one seeded epoch order, and rank r takes its
  share (``RankShare``), so the global batches are the same at any number of ranks; a resume at
  another rank count keeps the checkpoint's global batch (hooks.per_rank_batch).
- SFT's loss is a mean over the batch's *trained tokens*, and ranks hold different numbers of
  them: each rank's mean is weighted by N n_r / n (``TokenShare``; n_r its trained tokens, n
  the global batch's, one small all-reduce per micro-batch), so the averaged gradient is the
  gradient of the global batch's token mean, as on one rank. A plain average of the ranks'
  means would weight a rank's tokens by how few its rows hold. DPO's loss is a mean over
  pairs, equal in number on every rank: a plain average is right.
- Validation: each rank scores its share of the held-out rows or pairs, and the sums (loss x
  count, count) are all-reduced, so every rank gets the one-process number.
- Files: rank 0 alone writes (the run directory's cleanup, OUT/init-merged, the reference
  log-prob cache, the log, checkpoints, curves, eval.json); the others wait at barriers, read
  what it wrote, and compute the rest themselves (the built-in task's pairs and reference
  log-probs are deterministic).
- GRPO: the global batch of N x batch_size prompts is split the same way; each prompt's
  sampling seed is drawn for the global batch from the one generator every rank holds
  (``GRPO.seeds``), so a prompt's group of answers is the one a single process samples. The
  loss is a mean over the kept groups' answer tokens, which differ between ranks: weighted as
  SFT's (``TokenShare``, the count known once the rank has sampled), and so is the KL metric.
  ZeRO-3 is refused: sampling inside the step reads whole weights, which stage 3 holds only
  block by block.

Why a driver beside stage.run rather than a ``comm`` argument to it: what ranks change (the
shares, the token weighting, the validation sums, the barriers around rank 0's writes) stays
in one file, and stage.run stays the one-process path a reader follows first; everything
else is stage.py's, called from here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tinylm.train.objectives import Objective


class RankShare:
    """A data source built for the global batch, serving this rank's share of each batch.
    ``kind``: "rows" (a tuple of arrays, rows on axis 0: SFT's (x, y)) or "pairs" (DPO's dict:
    x and y hold the P chosen rows, then the P rejected rows; ref is (P, 2)) or "list" (GRPO's
    prompt records)."""

    def __init__(self, data, rank: int, world: int, kind: str):
        self.data, self.rank, self.world, self.kind = data, rank, world, kind
        self.tokens_per_batch = getattr(data, "tokens_per_batch", 0)  # the global batch's, as BatchSampler's

    def _part(self, n: int) -> slice:
        if n % self.world:
            raise ValueError(f"a batch of {n} does not split over {self.world} ranks")
        b = n // self.world
        return slice(self.rank * b, (self.rank + 1) * b)

    def next(self):
        batch = self.data.next()
        if self.kind == "list":
            return batch[self._part(len(batch))]
        if self.kind == "rows":
            s = self._part(len(batch[0]))
            return tuple(np.ascontiguousarray(a[s]) for a in batch)
        P = len(batch["ref"])
        s = self._part(P)
        rows = np.r_[np.arange(P)[s], P + np.arange(P)[s]]
        return {"x": np.ascontiguousarray(batch["x"][rows]), "y": np.ascontiguousarray(batch["y"][rows]),
                "ref": np.ascontiguousarray(batch["ref"][s])}

    def state(self):
        return self.data.state()

    def set_state(self, state):
        self.data.set_state(state)

    def __len__(self):
        return len(self.data)


class TokenShare(Objective):
    """An objective whose loss is a mean over a count of units that differs between ranks
    (``count(batch)``, asked after the loss: SFT's trained tokens, GRPO's kept answer tokens),
    weighted by N n_r / n so that averaging the ranks' gradients gives the gradient of the
    global mean. Reports the global count as ``metric`` (None: not reported); the metrics named
    in ``weighted`` are means over the same units and get the same weight (averaged over ranks,
    they are the global batch's)."""

    def __init__(self, inner, comm, count, metric: str | None = "trained_tokens", weighted=()):
        self.inner, self.comm, self.count, self.metric, self.weighted = inner, comm, count, metric, tuple(weighted)
        self.name = inner.name

    def loss(self, model, batch):
        loss, metrics = self.inner.loss(model, batch)
        n_r = float(self.count(batch))
        n = float(self.comm.allreduce([n_r], "loss units of the global batch")[0])
        w = self.comm.size * n_r / n if n else 0.0
        metrics = dict(metrics)  # the same keys on every rank (global_step_stats sums them)
        for k in self.weighted:
            if k in metrics:
                metrics[k] = float(metrics[k]) * w
        if self.metric:
            metrics[self.metric] = n
        if n == 0:
            return None, metrics  # nothing to train on any rank: the step skips this micro-batch
        if loss is None or n_r == 0:
            # others train on this micro-batch: it counts here too, as 0 (the logged loss is then
            # the mean over the micro-batches that trained anywhere, as in one process)
            return 0.0, metrics
        return (loss if w == 1.0 else loss * w), metrics

    def state(self):
        return self.inner.state()

    def set_state(self, state):
        self.inner.set_state(state)


def _share(items, rank: int, world: int):
    """Rank r's contiguous share of a list or array (shares differ by at most one item)."""
    n = len(items)
    return items[rank * n // world:(rank + 1) * n // world]


def _global_mean(comm, value: float, count: float) -> float:
    tot = comm.allreduce([value * count if count else 0.0, count], "validation over ranks")
    return float(tot[0] / tot[1]) if tot[1] else float("nan")


# ---- the stages' data, per rank --------------------------------------------------------------------
def sft_setup(cfg, model, tok, chat, comm):
    from tinylm.posttrain import stage  # noqa: PLC0415
    from tinylm.posttrain.chat import IGNORE  # noqa: PLC0415
    from tinylm.posttrain.data import SFTRows, fixed_sft_batches  # noqa: PLC0415
    from tinylm.posttrain.sft import SFT, evaluate_sft  # noqa: PLC0415

    train_s, val_s, T, pad = stage.sft_data(cfg, model, tok, chat)
    N, r = comm.size, comm.rank
    data = RankShare(SFTRows(train_s, T, cfg.batch_size * N, cfg.seed, pad, cfg.packing), r, N, "rows")
    # the one-process validation batches, each cut into the ranks' rows
    val = [tuple(_share(a, r, N) for a in b) for b in fixed_sft_batches(val_s, T, cfg.batch_size * N, pad,
                                                                          cfg.packing)]
    val = [b for b in val if len(b[0])]

    def evaluate(m):
        n = float(sum(int((y != IGNORE).sum()) for _, y in val))
        return _global_mean(comm, evaluate_sft(m, val) if n else 0.0, n)

    count = lambda batch: int((batch[1] != IGNORE).sum())  # noqa: E731
    return TokenShare(SFT(), comm, count), data, evaluate if val_s else None


def dpo_setup(cfg, policy, tok, chat, out: Path, comm):
    from safetensors.numpy import load_file, save_file  # noqa: PLC0415

    from tinylm.posttrain import stage  # noqa: PLC0415
    from tinylm.posttrain.data import Fit, preference_record  # noqa: PLC0415
    from tinylm.posttrain.dpo import DPO, PairBatches, evaluate_pairs, reference_logprobs, render_pairs  # noqa: PLC0415
    recs = stage._read(cfg, preference_record) if cfg.data else stage.builtin_pairs(cfg, policy, tok, chat)
    fit = Fit(policy.config.block_size + 1, cfg.overflow)
    pairs = render_pairs(chat, recs, fit)
    print(f"DPO data: {len(pairs)} pairs; {fit.summary('sequences')}", flush=True)
    pad = tok.eot_id if tok.eot_id is not None else chat.end_id
    cache = out / "ref_logprobs.safetensors"
    key = stage._fingerprint(pairs, cfg)
    ref = None
    comm.barrier("reference cache")  # every rank reads the cache before rank 0 may rewrite it
    if cache.is_file():
        try:
            d = load_file(str(cache))
            if str(d["key"].tobytes().decode()) == key:
                ref = d["ref"]
        except Exception:  # noqa: BLE001 - a bad cache is recomputed
            ref = None
    comm.barrier("reference cache")
    if ref is None:  # every rank computes the same numbers; rank 0 keeps them
        with stage.reference(cfg, policy) as m:
            ref = reference_logprobs(m, pairs, pad, average=cfg.average_logprobs)
        if comm.rank == 0:
            save_file({"ref": ref, "key": np.frombuffer(key.encode(), dtype=np.uint8).copy()}, str(cache))
        print(f"reference log-probs computed for {len(pairs)} pairs (cached in {cache})", flush=True)
    else:
        print(f"reference log-probs read from {cache}", flush=True)
    tr, va = stage._split(list(range(len(pairs))), cfg.val_every)
    N, r = comm.size, comm.rank
    if len(tr) < cfg.batch_size * N:
        raise ValueError(f"{len(tr)} training pairs, fewer than one global batch of {cfg.batch_size} x {N} ranks")
    data = RankShare(PairBatches([pairs[i] for i in tr], ref[tr], cfg.batch_size * N, cfg.seed, pad), r, N, "pairs")
    mine = _share(va, r, N)
    vp, vr = [pairs[i] for i in mine], ref[mine]

    def evaluate(m):
        v = evaluate_pairs(m, vp, vr, cfg.beta, pad, cfg.average_logprobs) if vp else 0.0
        return _global_mean(comm, v, float(len(vp)))

    return DPO(cfg.beta, cfg.average_logprobs), data, evaluate if va else None


def grpo_setup(cfg, policy, tok, chat, out: Path, comm):
    from tinylm.posttrain import stage  # noqa: PLC0415

    obj, data, ev = stage.grpo_setup(cfg, policy, tok, chat, out, ranks=comm.size)
    obj.share = (comm.rank, comm.size)
    shared = RankShare(data, comm.rank, comm.size, "list")
    return TokenShare(obj, comm, lambda batch: obj.last_tokens, metric=None, weighted=("kl",)), shared, ev


# ---- the stage ------------------------------------------------------------------------------------
def run_stage(kind: str, cfg, comm, zero: int = 0, resume: bool = False, overwrite: bool = False,
              sources: dict | None = None, max_steps: int | None = None) -> dict:
    """stage.run on the ranks of ``comm`` (a SingleProcess communicator resumes a multi-rank
    checkpoint in one process with its global batch). Every rank calls it."""
    from tinylm.distributed.hooks import per_rank_batch  # noqa: PLC0415
    from tinylm.posttrain import stage  # noqa: PLC0415
    from tinylm.train.checkpoint import clean_stale  # noqa: PLC0415
    from tinylm.train.loop import Trainer, cut_log  # noqa: PLC0415

    if kind not in ("sft", "dpo", "grpo"):
        raise ValueError(f"unknown stage {kind!r}")
    rank, N = comm.rank, comm.size
    main = rank == 0
    out = Path(cfg.out_dir)
    state, notes = None, []
    if resume:
        state = stage.resume_state(out, kind)
        notes = per_rank_batch(cfg, state, sources, N)
        cfg = stage._reconcile(cfg, state["train_config"], sources)
    stage.check(cfg, sources, check_paths=not resume)
    if zero == 3 and cfg.lora_rank:
        raise ValueError("zero=3 shards parameters layer by layer; with LoRA only the adapters train: use zero 0-2")
    if zero == 3 and kind == "grpo":
        raise ValueError("zero=3 holds each block's weights only during its forward and backward; GRPO samples "
                         "from the whole model inside each step: use zero 0-2")
    out.mkdir(parents=True, exist_ok=True)
    holds = stage.holds_run(out)
    comm.barrier("run directory")  # every rank has looked before rank 0 changes anything
    if not resume and holds and not overwrite:
        raise stage.refuse_other_run(out)
    if main:
        for line in clean_stale(out):
            print(line, flush=True)
        if not resume and holds:
            stage.clear_run(out)
        for line in notes:
            print(line, flush=True)
    comm.barrier("run directory")
    # rank 0 first: it may write OUT/init-merged, which the others then find and read
    if main:
        prepared = stage.prepare_model(cfg, out)
    comm.barrier("model preparation on rank 0")
    if not main:
        prepared = stage.prepare_model(cfg, out)
    policy, tok, chat, lora_meta, _ = prepared

    results = {}
    builtin = not cfg.data
    if builtin and cfg.eval_init and cfg.task_eval and state is None:  # every rank: the same numbers
        results = stage.eval_before(kind, cfg, policy, tok, chat)

    if kind == "sft":
        obj, data, ev = sft_setup(cfg, policy, tok, chat, comm)
    elif kind == "dpo":
        obj, data, ev = dpo_setup(cfg, policy, tok, chat, out, comm)
    else:
        obj, data, ev = grpo_setup(cfg, policy, tok, chat, out, comm)

    trainer = Trainer(policy, obj, data, cfg, out, tok, ev, stage.meta_of(cfg, kind, lora_meta), comm=comm, zero=zero)
    if state is not None:
        trainer.restore(state)
        if main:
            cut_log(out / "log.jsonl", trainer.step)
    print(f"{kind}: {sum(trainer.opt.sizes):,} trainable parameters; {cfg.max_steps} steps of {cfg.batch_size} x "
          f"{cfg.grad_accum} x {N} ranks (zero={zero})", flush=True)
    summary = trainer.run(max_steps)
    trainer.opt.materialize()  # whole weights on every rank: the held-out scoring samples from them
    if main and (out / "log.jsonl").is_file():
        stage.plot_curves(out / "log.jsonl", stage.CURVES[kind], out / "curves.png", f"tinylm {kind}")
    if builtin and cfg.task_eval and summary["stopped"] != "interrupted":
        stage.eval_after(kind, cfg, policy, tok, chat, results, out, write=main)
    summary["results"] = results
    comm.barrier("end of the stage")
    comm.done()
    return summary
