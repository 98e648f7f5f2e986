"""``TrainConfig``: every setting of a training run, with a comment per field, and the one
validation pass over them that runs before any work starts.

Settings come from the defaults here, then a TOML file (``--config``), then ``key=value``
overrides and flags; ``sources`` records where each came from, so an error names the key, its
value and its source ("batch_size=0 (override): must be >= 1"). All problems are reported at
once. Model-shape constraints (n_embd divisible by n_head, ...) are checked here too, before a
tokenizer is trained or data is read.

On resume, the keys in ``RESUMABLE`` may change (they are applied and said); any other key
given with a value that differs from the checkpoint's is an error listing every difference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class TrainConfig:
    # data
    data: list[str] | None = None      # text files/dirs, or one prepared dir; None: Python's stdlib source
    out_dir: str = "out"               # checkpoint, log.jsonl and loss.png go here
    vocab_size: int = 2048             # BPE vocabulary when a tokenizer is trained here
    corpus_mb: float = 6.0             # built-in corpus: how many MB of stdlib source to use
    # model: "gpt" (GPTConfig) or "llama" (LlamaConfig)
    model: str = "gpt"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    block_size: int = 128
    dropout: float = 0.0               # gpt only: embedding and residual dropout
    bias: bool = True                  # gpt only: biases in linears and LayerNorms
    n_kv_head: int = 0                 # llama only: key/value heads (grouped-query attention); 0: n_head
    ffn_hidden: int = 0                # llama only: SwiGLU hidden width; 0: 8/3 n_embd rounded up to 32
    rope_theta: float = 10000.0        # llama only: RoPE base
    tie_embeddings: bool = True        # llama only: LM head shares the token embedding (gpt always does)
    # optimisation
    batch_size: int = 16               # sequences per micro-batch
    grad_accum: int = 1                # micro-batches per step
    max_steps: int = 2000              # steps of the schedule (~7.7 min on 2 cores: README)
    lr: float = 3e-3                   # peak learning rate
    min_lr: float = 3e-4               # end of the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0             # max global gradient norm (0: no clipping)
    # mixed precision [amp #13] (tinylm/amp/policy.py: what is stored in which format)
    dtype: str = "fp32"                # fp32, bf16 or fp16: weights and weight gradients; fp32 masters and moments
    master_weights: bool = True        # bf16 only: false keeps no fp32 master (stochastic rounding instead)
    loss_scale_init: float = 65536.0   # fp16: the first loss scale (2^16, as PyTorch's GradScaler)
    loss_scale_window: int = 2000      # fp16: clean steps after which the loss scale doubles
    loss_scale_min: float = 1.0        # fp16: training stops when the loss scale would fall below this
    # bookkeeping
    eval_interval: int = 250           # validate and checkpoint every N steps
    eval_batches: int = 8              # fixed validation batches
    log_interval: int = 10             # a log.jsonl line every N steps
    time_budget: float = 0.0           # minutes; stop (and checkpoint) when spent; 0: no limit
    seed: int = 1337
    keep_checkpoints: int = 1          # how many step checkpoints to keep under out/checkpoints/
    save_on_interrupt: bool = True     # Ctrl-C: finish the step, write a checkpoint, then stop
    sample_tokens: int = 200           # tokens to sample at the end (0: none)
    sample_prompt: str = "def "
    progress: bool = True
    # distributed (tinylm/distributed; run under `mpiexec -n N` or with `tinylm train --nproc N`)
    zero: int = 0                      # ZeRO stage: 0 replicate, 1 shard optimizer state, 2 + gradients, 3 + parameters
    bucket_mb: float = 4.0             # gradient bucket size: each bucket's reduction starts as backward completes it
    comm_timeout: float = 600.0        # seconds a collective may wait for the other ranks before aborting them all

    def model_config(self, vocab_size: int):
        """The model's config (GPTConfig or LlamaConfig) for this run."""
        from tinylm.models import model_class  # noqa: PLC0415

        _, config_cls = model_class(self.model)
        common = dict(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, block_size=self.block_size,
                      vocab_size=vocab_size)
        if self.model == "gpt":
            return config_cls(**common, dropout=self.dropout, bias=self.bias)
        return config_cls(**common, n_kv_head=self.n_kv_head or self.n_head, ffn_hidden=self.ffn_hidden,
                          rope_theta=self.rope_theta, tie_embeddings=self.tie_embeddings)


# keys a resumed run may change; any other differing key is an error
RESUMABLE = {"out_dir", "time_budget", "log_interval", "progress", "sample_tokens", "sample_prompt",
             "keep_checkpoints", "save_on_interrupt", "eval_batches", "eval_interval",
             "zero", "bucket_mb", "comm_timeout"}  # [distributed #14] a run resumes at any stage

_MIN1 = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_steps", "eval_interval",
         "eval_batches", "log_interval", "keep_checkpoints")
_MIN0 = ("warmup_steps", "sample_tokens", "seed", "n_kv_head", "ffn_hidden")


def validate(cfg, sources: dict | None = None, check_paths: bool = True) -> None:
    """Check every setting; raise one ValueError listing each problem with its key, value and
    source. Fields a config lacks are skipped (SFT and DPO configs reuse this)."""
    sources = sources or {}
    have = {f.name for f in fields(cfg)}
    errors: list[str] = []

    def bad(key, why):
        src = sources.get(key, "default")
        errors.append(f"{key}={getattr(cfg, key)!r} ({src}): {why}")

    for k in _MIN1:
        if k in have and getattr(cfg, k) < 1:
            bad(k, "must be >= 1")
    for k in _MIN0:
        if k in have and getattr(cfg, k) < 0:
            bad(k, "must be >= 0")
    if "vocab_size" in have and cfg.vocab_size < 257:
        bad("vocab_size", "must be >= 257 (the 256 bytes and an end-of-text token)")
    for k in ("lr",):
        if k in have and not (math.isfinite(cfg.lr) and cfg.lr > 0):
            bad(k, "must be a finite number > 0")
    if "min_lr" in have and not (math.isfinite(cfg.min_lr) and 0 <= cfg.min_lr <= max(cfg.lr, 0)):
        bad("min_lr", "must be between 0 and lr")
    for k in ("weight_decay", "grad_clip", "time_budget"):
        if k in have and not (math.isfinite(getattr(cfg, k)) and getattr(cfg, k) >= 0):
            bad(k, "must be a finite number >= 0")
    for k in ("beta1", "beta2"):
        if k in have and not 0 <= getattr(cfg, k) < 1:
            bad(k, "must be in [0, 1)")
    if "dropout" in have and not 0 <= cfg.dropout < 1:
        bad("dropout", "must be in [0, 1)")
    if "zero" in have and cfg.zero not in (0, 1, 2, 3):  # [distributed #14]
        bad("zero", "must be 0, 1, 2 or 3")
    for k in ("bucket_mb", "comm_timeout"):
        if k in have and not (math.isfinite(getattr(cfg, k)) and getattr(cfg, k) > 0):
            bad(k, "must be a finite number > 0")
    if "corpus_mb" in have and not cfg.corpus_mb > 0:
        bad("corpus_mb", "must be > 0")
    if "dtype" in have and cfg.dtype not in ("fp32", "bf16", "fp16"):  # [amp #13]
        bad("dtype", "must be fp32, bf16 or fp16")
    elif "master_weights" in have and not cfg.master_weights and cfg.dtype != "bf16":
        bad("master_weights", f"false is for dtype=bf16 (stochastic rounding), not dtype={cfg.dtype}")
    for k in ("loss_scale_init", "loss_scale_min"):
        if k in have and not (math.isfinite(getattr(cfg, k)) and getattr(cfg, k) > 0):
            bad(k, "must be a finite number > 0")
    if "loss_scale_window" in have and cfg.loss_scale_window < 1:
        bad("loss_scale_window", "must be >= 1")
    if {"loss_scale_init", "loss_scale_min"} <= have and cfg.loss_scale_min > cfg.loss_scale_init > 0:
        bad("loss_scale_min", f"must be <= loss_scale_init={cfg.loss_scale_init}")
    if "rope_theta" in have and not cfg.rope_theta > 0:
        bad("rope_theta", "must be > 0")
    if "model" in have:
        from tinylm.models import model_types  # noqa: PLC0415

        if cfg.model not in model_types():
            bad("model", f"must be one of {', '.join(model_types())}")
        elif cfg.n_head >= 1 and cfg.n_embd >= 1:
            if cfg.n_embd % cfg.n_head:
                bad("n_embd", f"must be divisible by n_head={cfg.n_head}")
            elif cfg.model == "gpt":
                if cfg.n_kv_head not in (0, cfg.n_head):
                    bad("n_kv_head", "is for model=llama (GPT has one key/value head per head)")
            else:
                kv = cfg.n_kv_head or cfg.n_head
                if kv > 0 and cfg.n_head % kv:
                    bad("n_kv_head", f"must divide n_head={cfg.n_head}")
                if (cfg.n_embd // cfg.n_head) % 2:
                    bad("n_embd", f"n_embd / n_head = {cfg.n_embd // cfg.n_head} must be even for RoPE")
    if check_paths and "data" in have and cfg.data:
        for p in cfg.data:
            if not Path(p).exists():
                errors.append(f"data: {p}: no such file or directory ({sources.get('data', 'default')})")
    if errors:
        raise ValueError("invalid settings:\n  " + "\n  ".join(errors))
