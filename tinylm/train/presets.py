"""Presets: a run sized to fill a wall-clock budget on the machine it runs on.

``tinylm train --preset hour`` (60 minutes) and ``--preset overnight`` (8 hours) choose the
model and the length of its schedule from *measured* speed, not from a table of machines:

1. Shapes are tried from a ladder (``LADDER``), smallest first. For each, a few real training
   steps (forward, backward, clipping, AdamW on random tokens of the run's vocabulary) are
   timed for ``MEASURE_S`` seconds after two warm-up steps; that gives its tokens/s here.
2. A shape is affordable when the budget lets it see at least ``TOKENS_PER_PARAM`` training
   tokens per non-embedding parameter. 20 is the Chinchilla rule of thumb for a
   compute-optimal run (Hoffmann et al., 2022); a smaller model trained longer is the better
   use of a small budget. The largest affordable shape is chosen (the smallest if none is).
3. ``max_steps`` = the time left after measuring, less a margin for validation, checkpoints
   and the final sample (``MARGIN``), times the chosen shape's steps/s. The warmup is 2% of
   the steps and validation runs 20 times in the run.

A measurement of a few seconds can be off: another job was running then and stopped, or
starts later. So the plan is checked against the run itself: at each validation in the first
half of the schedule (after warmup), the steps/s the run has achieved so far give the step it
can reach in the time left, and when that is more than 2% beyond the schedule's end, the
cosine is stretched to it (``Schedule.extend``, from the lr reached; said on a line and logged
in ``preset.json``). The budget is also set as ``time_budget``, so if the machine turns out
slower than measured (another job starts, the laptop throttles) the run stops on time with a
checkpoint, and ``tinylm train --resume`` finishes the schedule. Everything the preset chose is printed and
stored in the checkpoint's config, so a resumed run keeps it; the measurements go to
``OUT/preset.json``.

Keys given explicitly (``key=value``, ``--config``, flags) win over the preset's choices. A
preset given any of the shape keys (``n_layer``, ``n_head``, ``n_embd``, ``block_size``) keeps
that shape, measures it alone and sizes only the schedule.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

PRESETS = {"hour": 60.0, "overnight": 480.0}
TOKENS_PER_PARAM = 20.0
MARGIN = 0.02          # of the remaining time: validation, checkpoints, plots, the final sample
BATCH = 16             # sequences per step for every shape
WARMUP_STEPS, TIMED_STEPS = 2, 4
MEASURE_S = 8.0       # seconds of timed steps per shape
REPLAN_MIN_STEPS = 20  # the run's own speed is trusted after this many steps

# (n_layer, n_head, n_embd, block_size, lr), smallest first
LADDER = (
    (4, 4, 128, 128, 3e-3),
    (4, 4, 192, 128, 3e-3),   # the default model
    (6, 6, 256, 256, 2e-3),
    (8, 8, 320, 256, 1.5e-3),
    (8, 8, 384, 256, 1.2e-3),
    (12, 12, 384, 256, 1e-3),
)
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size")
# what a preset sets besides the shape; each only where the user did not give it
CORPUS = {"vocab_size": 4096, "corpus_mb": 64.0}  # the built-in corpus: all of the standard library


def corpus_defaults(cfg, given: set):
    """The data settings of a preset (before the tokenizer is trained): a 4096-token vocabulary
    and the whole built-in corpus, where the user gave neither."""
    return replace(cfg, **{k: v for k, v in CORPUS.items() if k not in given})


def non_embedding_params(n_layer: int, n_embd: int) -> int:
    """Attention (4 C^2 + biases) and MLP (8 C^2 + biases) and norms per block: ~12 L C^2."""
    return n_layer * (12 * n_embd * n_embd + 13 * n_embd)


def measure(cfg, vocab_size: int, seconds: float | None = None, warmup: int = WARMUP_STEPS) -> float:
    """Tokens/s of full training steps of ``cfg``'s model on random tokens: after ``warmup``
    steps, as many steps as fit in ``seconds`` (at least ``TIMED_STEPS``), total tokens over
    total time, so a burst of someone else's load is averaged in rather than dodged."""
    from tinylm.models import model_class  # noqa: PLC0415
    from tinylm.optim import AdamW  # noqa: PLC0415

    cls, _ = model_class(cfg.model)
    model = cls(cfg.model_config(vocab_size), seed=0)
    opt = AdamW(model.param_groups(cfg.weight_decay), lr=1e-4, betas=(cfg.beta1, cfg.beta2))
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab_size, (cfg.batch_size, cfg.block_size + 1))

    def step():
        _, loss = model(x[:, :-1], x[:, 1:], return_logits=False)
        loss.backward()
        opt.clip_grad_norm(1.0)
        opt.step()
        opt.zero_grad()

    for _ in range(warmup):
        step()
    seconds = MEASURE_S if seconds is None else seconds
    n, t0 = 0, time.perf_counter()
    while n < TIMED_STEPS or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n * cfg.batch_size * cfg.block_size / (time.perf_counter() - t0)


def plan(cfg, name: str, vocab_size: int, given: set, elapsed_s: float = 0.0, measure_fn=None,
         log=print) -> tuple[object, dict]:
    """The config a preset run uses and a record of how it was chosen.

    ``given``: keys the user set (they are kept). ``elapsed_s``: time already spent on this
    run (data preparation) that the budget must include. ``measure_fn(cfg, vocab) -> tokens/s``.
    """
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: unknown; choose one of {', '.join(PRESETS)}")
    budget_s = PRESETS[name] * 60.0
    if "time_budget" in given and cfg.time_budget > 0:
        budget_s = cfg.time_budget * 60.0
    measure_fn = measure_fn or measure
    t0 = time.perf_counter()
    fixed_shape = any(k in given for k in SHAPE_KEYS)
    if "batch_size" not in given:
        cfg = replace(cfg, batch_size=BATCH)
    ladder = [None] if fixed_shape else LADDER
    tried, chosen = [], None
    for shape in ladder:
        c = cfg if shape is None else replace(cfg, **dict(zip(SHAPE_KEYS, shape[:4])),
                                             **({} if "lr" in given else {"lr": shape[4], "min_lr": shape[4] / 10}))
        tps = measure_fn(c, vocab_size)
        spent = elapsed_s + (time.perf_counter() - t0)
        left = max(budget_s - spent, 0.0) * (1.0 - MARGIN)
        n = non_embedding_params(c.n_layer, c.n_embd)
        ok = tps * left >= TOKENS_PER_PARAM * n
        tried.append({"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "block_size": c.block_size,
                      "non_embedding_params": n, "tokens_per_s": round(tps, 1),
                      "tokens_in_budget": int(tps * left), "affordable": bool(ok)})
        log(f"preset {name}: {c.n_layer} layers x {c.n_embd} wide, context {c.block_size}: {tps:,.0f} tokens/s "
            f"-> {tps * left / 1e6:.1f}M tokens in the budget, {tps * left / n:.0f} per non-embedding parameter "
            f"({'affordable' if ok else f'under {TOKENS_PER_PARAM:.0f}'})")
        if ok or chosen is None:
            chosen = (c, tps)
        if not ok:
            break
    c, tps = chosen
    spent = elapsed_s + (time.perf_counter() - t0)
    left = max(budget_s - spent, 1.0) * (1.0 - MARGIN)
    steps = max(int(left * tps / (c.batch_size * c.block_size * c.grad_accum)), 1)
    changes = {}
    if "max_steps" not in given:
        changes["max_steps"] = steps
    if "warmup_steps" not in given:
        changes["warmup_steps"] = max(steps // 50, 1)
    if "eval_interval" not in given:
        changes["eval_interval"] = max(changes.get("max_steps", c.max_steps) // 20, 1)
    # the trainer's clock starts after this: what is left of the whole budget
    changes["time_budget"] = round(max(budget_s - spent, 1.0) / 60.0, 3)
    c = replace(c, **changes)
    record = {"preset": name, "budget_min": budget_s / 60.0, "tokens_per_param": TOKENS_PER_PARAM,
              "measured": tried, "chosen": {k: getattr(c, k) for k in (*SHAPE_KEYS, "batch_size", "lr", "min_lr",
                                                                     "max_steps", "warmup_steps", "eval_interval",
                                                                     "time_budget")},
              "planning_s": round(time.perf_counter() - t0, 1),
              "planned_steps_per_s": tps / (c.batch_size * c.block_size * c.grad_accum)}
    log(f"preset {name}: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, context {c.block_size}; "
        f"{c.max_steps:,} steps of {c.batch_size * c.block_size * c.grad_accum:,} tokens, lr {c.lr:g}, "
        f"time budget {c.time_budget:g} min")
    return c, record


def replanner(record: dict, out: Path, log=print):
    """The Trainer's ``replan`` hook for a preset run (see the module docstring)."""

    def replan(trainer, since_start: float, since_first: float, steps: int):
        cfg, sched, step = trainer.cfg, trainer.schedule, trainer.step
        if step < sched.warmup or step > sched.end / 2 or steps < REPLAN_MIN_STEPS or since_first <= 0 or cfg.time_budget <= 0:
            return None
        rate = steps / since_first
        left = cfg.time_budget * 60.0 - since_start
        reach = step + int(left * (1.0 - MARGIN) * rate)
        if reach <= sched.end * 1.02:
            return None
        log(f"preset {record['preset']}: the run does {rate:.2f} steps/s (planned from "
            f"{record['planned_steps_per_s']:.2f}); schedule stretched from {sched.end:,} to {reach:,} steps")
        record.setdefault("replans", []).append({"at_step": step, "steps_per_s": round(rate, 3), "from": sched.end,
                                                 "to": reach})
        write_record(out, record)
        return reach

    return replan


def write_record(out: Path, record: dict) -> None:
    tmp = out / "preset.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / "preset.json")
