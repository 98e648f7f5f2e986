"""The training loop: text in, a trained GPT, a loss curve and samples out.

``train(cfg)`` does, in order: get tokens (a prepared directory from ``tinylm prepare``, or text
files tokenized here, or by default the source of Python's standard library), build the model
and AdamW, then loop: sample a batch of random windows, forward, backward (with gradient
accumulation), clip by global norm, step with warmup + cosine LR; every ``eval_interval`` steps
measure validation loss on a fixed set of batches and write a checkpoint. Losses are reported
as nats per token, perplexity and bits per byte side by side.

Nothing is lost on a crash: a checkpoint is written to a temporary directory and renamed into
place; a NaN or infinite loss stops training with a message and leaves the last good
checkpoint as it was; ``resume=True`` continues exactly (model, optimizer moments, step, and
the sampler's and dropout's RNG states are all restored), so the losses equal those of a run
that never stopped.

Files in ``out_dir``: ``checkpoint/`` (model.safetensors, optimizer.safetensors, state.json,
tokenizer.json), ``log.jsonl`` (one JSON object per logged step), ``loss.png``.
Leaves out: data-parallel training, mixed precision (later issues).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from tinylm.checkpoint import load_checkpoint, save_checkpoint
from tinylm.corpus import TokenData, get_tokens
from tinylm.models import GPT, GPTConfig
from tinylm.optim import AdamW, cosine_lr
from tinylm.tensor import no_grad


@dataclass
class TrainConfig:
    # data
    data: list[str] | None = None      # text files/dirs, or one prepared dir; None: Python's stdlib source
    out_dir: str = "out"               # checkpoint, log.jsonl and loss.png go here
    vocab_size: int = 2048             # BPE vocabulary when a tokenizer is trained here
    corpus_mb: float = 6.0             # built-in corpus: how many MB of stdlib source to use
    # model (GPTConfig)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    block_size: int = 128
    dropout: float = 0.0
    bias: bool = True
    # optimisation
    batch_size: int = 16               # sequences per micro-batch
    grad_accum: int = 1                # micro-batches per step
    max_steps: int = 2000               # ~7.5 min on 2 cores (README: a real run)
    lr: float = 3e-3                   # peak learning rate
    min_lr: float = 3e-4               # end of the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0             # max global gradient norm (0: no clipping)
    # bookkeeping
    eval_interval: int = 250           # validate and checkpoint every N steps
    eval_batches: int = 8              # fixed validation batches
    log_interval: int = 10
    time_budget: float = 0.0           # minutes; stop (and checkpoint) when spent; 0: no limit
    seed: int = 1337
    sample_tokens: int = 200           # tokens to sample at the end (0: none)
    sample_prompt: str = "def "
    progress: bool = True

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, block_size=self.block_size,
                         vocab_size=vocab_size, dropout=self.dropout, bias=self.bias)


class BatchSampler:
    """Random windows of block_size + 1 tokens from a token array, from a seeded Generator
    whose state is saved in checkpoints (so a resumed run draws the same batches)."""

    def __init__(self, tokens, batch_size: int, block_size: int, seed: int):
        if len(tokens) < block_size + 2:
            raise ValueError(f"the training data has {len(tokens)} tokens, fewer than block_size + 2 = {block_size + 2}")
        self.tokens, self.B, self.T = tokens, batch_size, block_size
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        starts = self.rng.integers(0, len(self.tokens) - self.T - 1, self.B)
        win = np.stack([np.asarray(self.tokens[s : s + self.T + 1], dtype=np.int64) for s in starts])
        return win[:, :-1], win[:, 1:]  # inputs (B, T), targets (B, T): the next token

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def fixed_batches(tokens, batch_size: int, block_size: int, n: int, seed: int) -> list:
    """The validation set: ``n`` batches drawn once from a fixed seed, the same every eval."""
    T = min(block_size, len(tokens) - 2)
    if T < 1:
        raise ValueError(f"the validation data has {len(tokens)} tokens: too few for one window")
    s = BatchSampler(tokens, batch_size, T, seed)
    return [s.next() for _ in range(n)]


def evaluate(model: GPT, batches) -> float:
    model.eval()
    total = 0.0
    with no_grad():
        for x, y in batches:
            total += model(x, y)[1].item()
    model.train()
    return total / len(batches)


def loss_report(nats: float, bytes_per_token: float) -> dict:
    """One loss three ways: nats per token, perplexity, bits per byte (comparable across
    tokenizers: nats/token / bytes/token / ln 2)."""
    return {"loss": nats, "ppl": math.exp(min(nats, 50.0)), "bpb": nats / bytes_per_token / math.log(2)}


def train(cfg: TrainConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Train; returns a summary dict (final losses, steps, tokens/s, paths)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoint"
    state = None
    if resume:
        if not (ckpt_dir / "state.json").exists():
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}")
        state = load_checkpoint(ckpt_dir)
        saved = TrainConfig(**{k: v for k, v in state["train_config"].items() if k in {f.name for f in fields(TrainConfig)}})
        # the run's shape comes from the checkpoint; only how long to run may change
        cfg = TrainConfig(**{**asdict(saved), "max_steps": cfg.max_steps, "time_budget": cfg.time_budget,
                             "progress": cfg.progress, "out_dir": cfg.out_dir, "sample_tokens": cfg.sample_tokens})
    stop_at = cfg.max_steps if max_steps is None else min(max_steps, cfg.max_steps)

    data: TokenData = get_tokens(cfg, out, tokenizer_path=(ckpt_dir / "tokenizer.json") if state else None)
    model = GPT(cfg.model_config(data.tokenizer.vocab_size), seed=cfg.seed)
    opt = AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    sampler = BatchSampler(data.train, cfg.batch_size, cfg.block_size, cfg.seed)
    val_batches = fixed_batches(data.val, cfg.batch_size, cfg.block_size, cfg.eval_batches, cfg.seed + 1)
    step, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.set_state(state["sampler"])
        model.dropout_rng.bit_generator.state = state["dropout_rng"]
        step = state["step"]
        history = state.get("history", [])

    log_path = out / "log.jsonl"
    log = open(log_path, "a" if resume else "w", encoding="utf-8")
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    n_params = model.num_params()
    print(f"model: {n_params / 1e6:.2f}M parameters ({cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, "
          f"context {cfg.block_size}, vocab {data.tokenizer.vocab_size}); train {len(data.train):,} tokens, "
          f"val {len(data.val):,}; {tokens_per_step} tokens/step", flush=True)

    def checkpoint(at_step):
        save_checkpoint(ckpt_dir, model, opt, {
            "step": at_step, "train_config": asdict(cfg), "model_config": asdict(model.config),
            "sampler": sampler.state(), "dropout_rng": model.dropout_rng.bit_generator.state, "history": history,
            "bytes_per_token": data.bytes_per_token,
        }, data.tokenizer)

    from tqdm import tqdm  # noqa: PLC0415

    bar = tqdm(total=stop_at, initial=step, disable=not cfg.progress, unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    t_last, tok_since = t_start, 0
    losses = []
    last_val = None
    t_first = t_start
    stopped = "max_steps"
    try:
        while step < stop_at:
            lr = cosine_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
            opt.zero_grad()
            loss_sum = 0.0
            for _ in range(cfg.grad_accum):
                x, y = sampler.next()
                _, loss = model(x, y)
                if cfg.grad_accum > 1:
                    loss = loss * (1.0 / cfg.grad_accum)
                loss.backward()
                loss_sum += loss.item()
            if not math.isfinite(loss_sum):
                stopped = "nan"
                raise FloatingPointError(
                    f"loss became {loss_sum} at step {step}; stopping. The last good checkpoint "
                    f"({ckpt_dir}) is kept; try a lower lr (now {cfg.lr}) or more warmup_steps.")
            norm = opt.clip_grad_norm(cfg.grad_clip)
            opt.step(lr)
            step += 1
            tok_since += tokens_per_step
            losses.append(loss_sum)
            if len(losses) == 1:
                t_first = time.perf_counter()  # the first step includes JIT compiles: leave it out of tokens/s
            bar.update(1)
            if step % cfg.log_interval == 0 or step == stop_at:
                now = time.perf_counter()
                tps = tok_since / max(now - t_last, 1e-9)
                t_last, tok_since = now, 0
                rec = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": norm, "tokens_per_s": round(tps, 1),
                       "elapsed_s": round(now - t_start, 2)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                history.append({"step": step, "train": float(np.mean(losses[-cfg.log_interval:]))})
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            budget_spent = cfg.time_budget > 0 and time.perf_counter() - t_start > cfg.time_budget * 60
            if step % cfg.eval_interval == 0 or step == stop_at or budget_spent:
                v = evaluate(model, val_batches)
                if not math.isfinite(v):
                    stopped = "nan"
                    raise FloatingPointError(f"validation loss became {v} at step {step}; the last good checkpoint is kept")
                last_val = loss_report(v, data.bytes_per_token)
                history.append({"step": step, "val": v})
                log.write(json.dumps({"step": step} | {"val_" + k: val for k, val in last_val.items()}) + "\n")
                log.flush()
                tr = loss_report(float(np.mean(losses[-cfg.log_interval:])), data.bytes_per_token)
                bar.write(f"step {step:5d} | train {tr['loss']:.4f} nats/tok, ppl {tr['ppl']:.2f}, {tr['bpb']:.3f} bpb | "
                          f"val {last_val['loss']:.4f} nats/tok, ppl {last_val['ppl']:.2f}, {last_val['bpb']:.3f} bpb")
                checkpoint(step)
                plot_losses(history, out / "loss.png")
            if budget_spent:
                stopped = "time_budget"
                break
    finally:
        bar.close()
        log.close()
    elapsed = time.perf_counter() - t_start
    timed = len(losses) - 1
    tps = timed * tokens_per_step / max(time.perf_counter() - t_first, 1e-9) if timed > 0 else 0.0
    return {"steps": step, "stopped": stopped, "train_losses": losses, "val": last_val, "elapsed_s": elapsed,
            "model": model, "tokenizer": data.tokenizer, "checkpoint": str(ckpt_dir), "out_dir": str(out),
            "tokens_per_s": tps}


def plot_losses(history: list[dict], path: Path) -> None:
    """Train and validation loss against step, written as a PNG (matplotlib, no display)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    tr = [(h["step"], h["train"]) for h in history if "train" in h]
    va = [(h["step"], h["val"]) for h in history if "val" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1.2)
    if va:
        ax.plot(*zip(*va), "o-", label="validation", lw=1.5, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("tinylm training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
