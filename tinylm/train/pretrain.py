"""Pretraining: text in, a trained language model, a loss curve and samples out.

``train(cfg)`` checks every setting (tinylm.train.config.validate), gets tokens (a prepared
directory from ``tinylm prepare``, or text files tokenized here, or by default the source of
Python's standard library; tinylm.corpus), builds the model (``cfg.model``: gpt or llama)
and hands the loop (tinylm.train.loop.Trainer) the next-token objective, a batch sampler and
a fixed validation set. Losses are reported as nats per token, perplexity and bits per byte
side by side.

Resuming (``resume=True``) is what a user means by it: settings that cannot change mid-run
(model shape, data, optimiser, batch) are compared with the checkpoint's and any difference
is an error that lists them; settings that may change (time budget, log interval, ...) are
applied and said; more steps than the checkpoint's schedule planned need ``extend=True``,
which continues the cosine from the lr it has reached (never a silent restart); the log is
cut back to the checkpoint's step. An output directory that holds another run is refused
unless ``resume`` or ``overwrite``.

Files in ``out_dir``: ``checkpoint`` (a link to the newest of ``checkpoints/step-N``),
``log.jsonl`` (one JSON object per logged step), ``loss.png``, ``data/`` (the token cache).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from tinylm.corpus import get_tokens
from tinylm.tensor import no_grad
from tinylm.train.checkpoint import CheckpointError, clean_stale, load_checkpoint, load_tokenizer
from tinylm.train.config import RESUMABLE, TrainConfig, validate
from tinylm.train.loop import Trainer, cut_log
from tinylm.train.objectives import NextToken


class BatchSampler:
    """Random windows of block_size + 1 tokens from a token array, from a seeded Generator
    whose state is saved in checkpoints (so a resumed run draws the same batches)."""

    def __init__(self, tokens, batch_size: int, block_size: int, seed: int, rank: int = 0, world: int = 1):
        if len(tokens) < block_size + 1:
            raise ValueError(f"the training data has {len(tokens)} tokens, fewer than one window of "
                             f"block_size + 1 = {block_size + 1}")
        self.tokens, self.B, self.T = tokens, batch_size, block_size
        # [distributed #14] batch_size is per rank: each draw is the global batch of world * B
        # windows from the one generator, and rank r takes rows [r B, (r + 1) B); so the global
        # batches are the same whatever the number of ranks. tokens_per_batch is the global one.
        self.rank, self.world = rank, world
        self.tokens_per_batch = batch_size * block_size * world
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        starts = self.rng.integers(0, len(self.tokens) - self.T, self.B * self.world)  # s + T <= len - 1
        starts = starts[self.rank * self.B: (self.rank + 1) * self.B]
        win = np.stack([np.asarray(self.tokens[s : s + self.T + 1], dtype=np.int64) for s in starts])
        return win[:, :-1], win[:, 1:]  # inputs (B, T), targets (B, T): the next token

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def fixed_batches(tokens, batch_size: int, block_size: int, n: int, seed: int) -> list:
    """The validation set: ``n`` batches drawn once from a fixed seed, the same every eval."""
    T = min(block_size, len(tokens) - 1)
    if T < 1:
        raise ValueError(f"the validation data has {len(tokens)} tokens: too few for one window")
    s = BatchSampler(tokens, batch_size, T, seed)
    return [s.next() for _ in range(n)]


def evaluate(model, batches) -> float:
    """Mean next-token loss over fixed batches, in eval mode, without autograd."""
    was = model.training
    model.eval()
    total = 0.0
    with no_grad():
        for x, y in batches:
            total += model(x, y, return_logits=False)[1].item()
    model.train(was)
    return total / len(batches)


def _resolve_data(data, base: Path | None = None):
    if not data:
        return None
    return [str((Path(p) if Path(p).is_absolute() or base is None else base / p).resolve()) for p in data]


def _holds_a_run(out: Path) -> bool:
    link = out / "checkpoint"
    log = out / "log.jsonl"
    return link.exists() or link.is_symlink() or (out / "checkpoints").is_dir() or (log.is_file() and log.stat().st_size > 0)


# the settings every checkpoint's train_config has (TrainConfig's first release); a key added
# since may be missing from an older checkpoint, and then takes its default
_FIRST_KEYS = frozenset(
    "data out_dir vocab_size corpus_mb n_layer n_head n_embd block_size dropout bias batch_size grad_accum "
    "max_steps lr min_lr warmup_steps weight_decay beta1 beta2 grad_clip eval_interval eval_batches "
    "log_interval time_budget seed sample_tokens sample_prompt progress".split())


def _saved_config(saved: dict, where: Path) -> tuple[TrainConfig, set]:
    """The checkpoint's train_config, type-checked and validated (a CheckpointError naming
    state.json if it is not a usable config), and the keys it lacks (newer than the
    checkpoint: they take the default, or the value given now)."""
    from tinylm.config import apply_dict  # noqa: PLC0415

    known = {f.name for f in fields(TrainConfig)}
    lost = sorted(_FIRST_KEYS - set(saved))
    if lost:
        raise CheckpointError(f"{where}: corrupted: train_config has no {', '.join(map(repr, lost))}"[:400])
    try:
        base = apply_dict(TrainConfig(), {k: v for k, v in saved.items() if k in known}, where="train_config")
        validate(base, {k: "checkpoint" for k in saved}, check_paths=False)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return base, known - set(saved)


def _reconcile(cfg: TrainConfig, saved: dict, sources: dict | None, extend: bool, step: int,
               where: Path = Path("state.json")):
    """The config a resumed run uses, and the lines that say what changed. Raises ValueError
    listing every setting that cannot change mid-run but was given differently."""
    base, missing = _saved_config(saved, where)
    given = {k for k, src in sources.items() if src != "default"} if sources is not None else \
        {f.name for f in fields(TrainConfig)}
    mine = asdict(cfg)
    changes, notes, frozen = {}, [], []
    for k in sorted(missing - given - {"out_dir"}):
        notes.append(f"resume: the checkpoint's train_config has no {k!r} (an older tinylm): "
                     f"using {getattr(base, k)!r}")
    for k in sorted(given):
        new, old = mine[k], getattr(base, k)
        if k == "data":
            new = _resolve_data(new)
        if new == old or (k == "data" and new is None):
            continue
        if k == "max_steps":
            continue  # below
        if k in RESUMABLE or k in missing:
            changes[k] = mine[k]
            notes.append(f"resume: {k} {old!r} -> {mine[k]!r}")
        else:
            frozen.append(f"{k}: checkpoint {old!r}, given {new!r}")
    if frozen:
        raise ValueError("--resume: these settings cannot change in the middle of a run (start a new run with "
                         "--out DIR, or drop them):\n  " + "\n  ".join(frozen))
    stop_at = None
    if "max_steps" in given and cfg.max_steps != base.max_steps:
        if cfg.max_steps <= step:
            raise ValueError(f"--resume: the checkpoint is at step {step}; max_steps={cfg.max_steps} leaves nothing "
                             f"to train (give a larger --max-steps, with --extend to lengthen the schedule)")
        if cfg.max_steps > base.max_steps and not extend:
            raise ValueError(f"--resume: the run's schedule ends at step {base.max_steps}; to train to "
                             f"{cfg.max_steps}, add --extend (the cosine continues from the lr it has reached down "
                             f"to min_lr at step {cfg.max_steps})")
        if cfg.max_steps > base.max_steps:
            changes["max_steps"] = cfg.max_steps
        if cfg.max_steps < base.max_steps:
            stop_at = cfg.max_steps
            notes.append(f"resume: stopping at step {cfg.max_steps} (the schedule still ends at {base.max_steps})")
    end = stop_at if stop_at is not None else changes.get("max_steps", base.max_steps)
    if end <= step:
        raise ValueError(f"--resume: the checkpoint is at step {step}, the end of its schedule: nothing to train "
                         f"(a larger --max-steps with --extend lengthens the schedule)")
    return TrainConfig(**{**asdict(base), **changes}), notes, stop_at


def _amp_note(cfg) -> str:
    """[amp #13] The model line's note on the number format of a 16-bit run."""
    dtype = getattr(cfg, "dtype", "fp32")
    if dtype == "fp32":
        return ""
    how = "fp32 master weights" if cfg.master_weights else "no master copy, stochastic rounding"
    return f"; {dtype} weights, activations and gradients, {how}" + (", dynamic loss scale" if dtype == "fp16" else "")


def train(cfg: TrainConfig, resume: bool = False, max_steps: int | None = None, overwrite: bool = False,
          extend: bool = False, sources: dict | None = None, preset: str | None = None) -> dict:
    """Train; returns a summary dict (final losses, steps, tokens/s, paths).

    ``max_steps`` stops early without changing the schedule (as a time budget does);
    ``sources`` (key -> where it was set, from the CLI) decides which settings a resume
    compares: without it every field of ``cfg`` counts as given. ``preset`` ("hour",
    "overnight"): the model and schedule are sized from measured speed to fill that time
    (tinylm/train/presets.py); the settings in ``sources`` are kept."""
    t_called = time.perf_counter()
    given = {k for k, src in (sources or {}).items() if src != "default"}
    if preset is not None:
        from tinylm.train import presets  # noqa: PLC0415

        if preset not in presets.PRESETS:
            raise ValueError(f"--preset {preset!r}: unknown; choose one of {', '.join(presets.PRESETS)}")
        if resume:
            raise ValueError("--preset plans a new run; a resumed run keeps the plan stored in its checkpoint "
                             "(drop --preset)")
        cfg = presets.corpus_defaults(cfg, given)
    validate(cfg, sources)
    from tinylm.distributed import world  # noqa: PLC0415 [distributed #14] None: one process
    from tinylm.distributed.hooks import mean_over_ranks, per_rank_batch  # noqa: PLC0415

    comm = world(getattr(cfg, "comm_timeout", None))
    rank, nranks = (0, 1) if comm is None else (comm.rank, comm.size)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for line in (clean_stale(out) if rank == 0 else ()):  # [distributed #14] rank 0 alone changes out/
        print(line, flush=True)
    ckpt = out / "checkpoint"
    state, notes, stop_at = None, [], None
    if resume:
        if not (ckpt / "state.json").exists():
            raise FileNotFoundError(f"--resume: no checkpoint in {out} (expected {ckpt})")
        state = load_checkpoint(ckpt)
        load_tokenizer(ckpt)  # checked here, as a CheckpointError; the data reader loads it again
        if comm is not None or "world_size" in state:  # [distributed #14] the global batch is what stays
            notes += per_rank_batch(cfg, state, sources, nranks)
        cfg, notes, stop_at = _reconcile(cfg, state["train_config"], sources, extend, state["step"],
                                         ckpt / "state.json")
        cfg = TrainConfig(**{**asdict(cfg), "out_dir": str(out)})
        validate(cfg, check_paths=False)
    elif rank == 0 and _holds_a_run(out):
        if not overwrite:
            raise ValueError(f"{out} holds another run (checkpoint or log.jsonl); pass --resume to continue it, "
                             f"--overwrite to replace it, or --out DIR for a new one")
        for p in (ckpt,):
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for name in ("log.jsonl", "loss.png"):
            (out / name).unlink(missing_ok=True)
    for line in notes:
        print(line, flush=True)
    if max_steps is not None:
        stop_at = min(max_steps, stop_at or max_steps)
        if state is not None and stop_at <= state["step"]:
            raise ValueError(f"--resume: the checkpoint is at step {state['step']}; stopping at step {stop_at} "
                             f"leaves nothing to train")
    cfg = TrainConfig(**{**asdict(cfg), "data": _resolve_data(cfg.data)})

    # a model config with a placeholder vocabulary: its shape errors surface before any data work
    cfg.model_config(max(cfg.vocab_size, 257))
    if rank > 0:  # [distributed #14] rank 0 builds the token cache (and tokenizer); the others then read it
        comm.barrier("data preparation on rank 0")
    data = get_tokens(cfg, out, tokenizer_path=(ckpt / "tokenizer.json") if state else None)
    if comm is not None and rank == 0:
        comm.barrier("data preparation on rank 0")
    from tinylm.models import model_class  # noqa: PLC0415

    if preset is not None:
        if comm is not None:
            raise ValueError("--preset measures one process's speed; size a data-parallel run with max_steps")
        cfg, record = presets.plan(cfg, preset, data.tokenizer.vocab_size, given,
                                   elapsed_s=time.perf_counter() - t_called, log=lambda m: print(m, flush=True))
        validate(cfg, check_paths=False)
        presets.write_record(out, record)
    model_cls, _ = model_class(cfg.model)
    model = model_cls(cfg.model_config(data.tokenizer.vocab_size), seed=cfg.seed)
    # [distributed #14] batch_size is per rank; the global batch (and validation set) is the same at any rank count
    sampler = BatchSampler(data.train, cfg.batch_size, cfg.block_size, cfg.seed, rank, nranks)
    val_batches = fixed_batches(data.val, cfg.batch_size * nranks, cfg.block_size, cfg.eval_batches, cfg.seed + 1)
    if comm is not None:
        mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
        val_batches = [(x[mine], y[mine]) for x, y in val_batches]

    def meta():
        return {"train_config": asdict(cfg), "bytes_per_token": data.bytes_per_token}

    trainer = Trainer(model, NextToken(), sampler, cfg, out, data.tokenizer,
                      lambda m: mean_over_ranks(comm, evaluate(m, val_batches)), meta, data.bytes_per_token,
                      comm=comm, zero=getattr(cfg, "zero", 0))
    if preset is not None:
        trainer.replan = presets.replanner(record, out, log=lambda m: print(m, flush=True))
    if state is not None:
        trainer.restore(state)
        dropped = cut_log(out / "log.jsonl", trainer.step)
        if dropped:
            print(f"resume: log.jsonl cut back to step {trainer.step} ({dropped} later lines dropped)", flush=True)
    if extend:
        if state is None:
            raise ValueError("--extend lengthens a resumed run's schedule: use it with --resume")
        target = cfg.max_steps
        if target > trainer.schedule.end:
            lr_now = trainer.schedule(trainer.step)
            trainer.schedule.extend(trainer.step, target)
            print(f"resume: schedule extended to step {target}: cosine from lr {lr_now:.3g} at step "
                  f"{trainer.step} to {cfg.min_lr:.3g}", flush=True)
    n_params = model.num_params()
    kv = f", {model.config.n_kv_head} kv heads" if getattr(model.config, "n_kv_head", model.config.n_head) != \
        model.config.n_head else ""
    print(f"model: {cfg.model}, {n_params / 1e6:.2f}M parameters ({cfg.n_layer} layers, {cfg.n_head} heads{kv}, "
          f"{cfg.n_embd} wide, context {cfg.block_size}, vocab {data.tokenizer.vocab_size}); train "
          f"{len(data.train):,} tokens, val {len(data.val):,}; "
          f"{cfg.batch_size * cfg.block_size * cfg.grad_accum * nranks} tokens/step"
          + (f" ({nranks} ranks, zero={cfg.zero})" if comm is not None else "")
          + _amp_note(cfg), flush=True)  # [amp #13]
    summary = trainer.run(stop_at)
    if comm is not None:  # [distributed #14] whole weights for sampling; a clean end on every rank
        trainer.opt.materialize()
        comm.barrier("end of training")
        comm.done()
    return summary
