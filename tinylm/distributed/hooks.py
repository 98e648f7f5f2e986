"""What tinylm.train.loop.Trainer calls when it runs on several ranks (its ``comm`` argument).

Kept here so the loop's own changes stay a few marked lines: the global batch's loss (every
rank logs and checks the same number, so a non-finite loss stops every rank at the same step),
and a checkpoint written once per step, consolidated, by rank 0 while the others wait.
"""
from __future__ import annotations


def global_step_stats(comm, loss_sum: float, used: int, acc: int, metrics: dict):
    """(loss, used, metrics) of the global batch: each rank's mean over the micro-batches it
    trained, weighted by how many it trained; metrics averaged over ranks (every rank runs the
    same objective, so the same keys). ``used`` comes back as ``acc`` when any rank trained
    (every rank then steps together: the collectives need all of them) and 0 when none did."""
    keys = sorted(metrics)
    local = loss_sum * acc / used if used else 0.0
    tot = comm.allreduce([local * used, used] + [metrics[k] for k in keys], "step loss")
    n_used = int(round(tot[1]))
    loss = float(tot[0] / n_used) if n_used else 0.0
    return loss, (acc if n_used else 0), {k: float(v / comm.size) for k, v in zip(keys, tot[2:])}


class _Gathered:
    """An optimizer-shaped holder for a state dict already gathered (checkpoint.py calls
    ``state_dict()`` on what it is given)."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


def save_distributed(trainer):
    """Every rank calls it: the optimizer state and (ZeRO-3) the weights are gathered, rank 0
    writes the checkpoint in the single-process format, and every rank waits at a barrier, so
    no rank runs ahead of a checkpoint that may not exist yet. Returns the step directory
    (on rank 0; None elsewhere)."""
    from tinylm.train.checkpoint import save_checkpoint  # noqa: PLC0415

    comm, opt = trainer.comm, trainer.opt
    state = opt.state_dict()
    path = None
    with opt.full_params():
        if comm.rank == 0:
            meta = trainer.state()
            meta["world_size"] = comm.size
            meta["zero"] = opt.stage
            with opt.masters_as_weights(state):  # [amp #13] a 16-bit run's checkpoint holds the fp32 masters
                path = save_checkpoint(trainer.ckpt_link, trainer.model, _Gathered(state), meta, trainer.tokenizer,
                                       keep=getattr(trainer.cfg, "keep_checkpoints", 1))
    comm.barrier("checkpoint barrier")
    return path


def mean_over_ranks(comm, value: float) -> float:
    if comm is None:
        return value
    return float(comm.allreduce([value], "mean over ranks")[0] / comm.size)



def per_rank_batch(cfg, state: dict, sources: dict | None, nranks: int) -> list[str]:
    """On resume, ``batch_size`` (per rank) follows the number of ranks so that the global
    batch stays the checkpoint's: ``state["train_config"]["batch_size"]`` is set to this run's
    per-rank batch (so the resume's comparison sees no change), and ``cfg.batch_size`` too when
    it was not given. A given batch_size that changes the global batch is an error; so is a
    global batch that does not divide over the ranks. Returns the notes to print."""
    tc = state.get("train_config", {})
    saved_world = int(state.get("world_size", 1))
    if "batch_size" not in tc:
        return []
    glob = int(tc["batch_size"]) * saved_world
    given = sources is None or sources.get("batch_size", "default") != "default"
    if given:
        if cfg.batch_size * nranks != glob:
            raise ValueError(f"--resume: batch_size={cfg.batch_size} on {nranks} rank(s) is a global batch of "
                             f"{cfg.batch_size * nranks}; the checkpoint's is {glob} ({tc['batch_size']} x "
                             f"{saved_world} ranks)")
        tc["batch_size"] = cfg.batch_size
        return []
    if glob % nranks:
        raise ValueError(f"--resume: the checkpoint's global batch of {glob} does not split over {nranks} ranks")
    if glob // nranks != tc["batch_size"]:
        note = (f"resume: batch_size {tc['batch_size']} -> {glob // nranks} per rank (the global batch of {glob} "
                f"on {nranks} rank(s))")
        tc["batch_size"] = glob // nranks
        cfg.batch_size = glob // nranks
        return [note]
    return []
