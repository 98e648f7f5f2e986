"""The training loop, written once for every objective.

``Trainer(model, objective, data, cfg, out_dir, tokenizer, evaluate).run(state)``: each step
takes ``cfg.grad_accum`` micro-batches from ``data`` (an object with ``next()``, ``state()``,
``set_state()``), asks the objective for each one's loss, backpropagates, clips the global
gradient norm, and steps AdamW over the flat ParamStore with the schedule's lr. Every
``log_interval`` steps a line goes to ``log.jsonl``; every ``eval_interval`` steps (and at the
end) ``evaluate(model)`` runs and a checkpoint is written (tinylm.train.checkpoint: switched in
atomically). A checkpoint holds everything a resume needs to continue exactly as if the run
had never stopped: weights, the optimizer's moments and step, the schedule, the data source's
and the objective's and dropout's random states, the log's history.

What can stop a run, and what it leaves:
- ``max_steps`` or the time budget: a final evaluation and checkpoint.
- a non-finite loss: stops with a message; the last good checkpoint is kept.
- Ctrl-C: the step in flight finishes, a checkpoint is written (``save_on_interrupt``) and
  the run says which step is kept; a second Ctrl-C stops at once, keeping the last checkpoint.
- a kill: the last checkpoint is intact (atomic switch); on resume the log is cut back to
  the checkpoint's step, so no step is logged twice.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from tinylm.amp import train as amp_train
from tinylm.optim import AdamW, ParamStore, Schedule
from tinylm.train.checkpoint import save_checkpoint


def loss_report(nats: float, bytes_per_token: float | None) -> dict:
    """One loss three ways: nats per token, perplexity, bits per byte (comparable across
    tokenizers: nats/token / bytes/token / ln 2)."""
    out = {"loss": nats, "ppl": math.exp(min(nats, 50.0))}
    if bytes_per_token:
        out["bpb"] = nats / bytes_per_token / math.log(2)
    return out


def _fmt(rep: dict) -> str:
    s = f"{rep['loss']:.4f} nats/tok, ppl {rep['ppl']:.2f}"
    return s + (f", {rep['bpb']:.3f} bpb" if "bpb" in rep else "")


def cut_log(path: Path, step: int) -> int:
    """Keep only the log lines of steps <= ``step`` (a resumed run re-logs the steps after its
    checkpoint). Rewritten atomically; returns how many lines were dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and int(rec.get("step", 0)) <= step
        except (ValueError, TypeError):
            ok = False  # a line cut short by a kill
        if ok:
            keep.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    tmp.replace(path)
    return dropped


class _Interrupt:
    """First Ctrl-C: ask the loop to stop at the next step boundary; second: stop now."""

    def __init__(self):
        self.requested = False
        self.prev = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to stop at once)", flush=True)

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)
        return False


class Trainer:
    def __init__(self, model, objective, data, cfg, out_dir, tokenizer, evaluate=None, meta=None,
                 bytes_per_token: float | None = None, store: ParamStore | None = None, comm=None, zero: int = 0):
        """``cfg``: lr, min_lr, warmup_steps, max_steps, grad_accum, grad_clip, weight_decay,
        beta1, beta2, eval_interval, log_interval, time_budget, progress, keep_checkpoints,
        save_on_interrupt (TrainConfig has them all). ``evaluate(model) -> float``: the
        validation loss (nats per unit). ``meta()``: extra JSON for state.json. ``comm``: a
        tinylm.distributed communicator (None: one process, this file's path unchanged) and
        ``zero`` its ZeRO stage (tinylm/distributed/zero.py)."""
        self.model, self.objective, self.data, self.cfg = model, objective, data, cfg
        self.out = Path(out_dir)
        self.tokenizer, self.evaluate, self.meta = tokenizer, evaluate, meta or (lambda: {})
        self.bytes_per_token = bytes_per_token
        self.store = store if store is not None else ParamStore.for_model(model, cfg.weight_decay)
        # [distributed #14] with a communicator, the data-parallel AdamW (ZeRO stage `zero`)
        self.comm, self.is_main = comm, comm is None or comm.rank == 0
        if comm is None:
            self.opt = AdamW(self.store, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        else:
            from tinylm.distributed.zero import ZeroOptimizer  # noqa: PLC0415

            self.opt = ZeroOptimizer(self.store, comm, zero, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                     bucket_mb=getattr(cfg, "bucket_mb", 4.0), model=model)
        self.schedule = Schedule(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        # [amp #13] cfg.dtype bf16/fp16: the store keeps fp32 masters beside the working copy; fp16 a loss scaler
        self.policy, self.scaler = amp_train.setup(self.store, cfg, comm, self.opt)  # [distributed #14] opt: sharded masters
        self.step, self.history, self.skipped = 0, [], 0
        self.ckpt_link = self.out / "checkpoint"
        self.last_saved = None
        # replan(trainer, s_since_start, s_since_first_step, steps_since_first) -> a later last step
        # or None, asked before each evaluation: the schedule is extended to it (tinylm/train/presets.py)
        self.replan = None

    # ---- state ------------------------------------------------------------------------------
    def _rng(self):
        return getattr(self.model, "dropout_rng", None)

    def state(self) -> dict:
        rng = self._rng()
        return dict(self.meta(), step=self.step, history=self.history, skipped_batches=self.skipped,
                    schedule=self.schedule.state(), sampler=self.data.state(),
                    objective=self.objective.state(), model_type=self.model.model_type,
                    model_config=self.model.config_dict(),
                    dropout_rng=None if rng is None else rng.bit_generator.state,
                    **amp_train.state(self.policy, self.scaler))  # [amp #13] {"amp": ...} in a 16-bit run

    def restore(self, state: dict) -> None:
        from tinylm.train.checkpoint import CheckpointError, load_weights  # noqa: PLC0415

        where = self.ckpt_link / "optimizer.safetensors"
        # [distributed #14] a sharded model loads through its optimizer (each rank keeps its range)
        (self.opt.load_weights if self.comm is not None else load_weights)(
            self.model, state["model"], self.ckpt_link / "model.safetensors")
        try:
            self.opt.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{where}: {e.args[0] if e.args else e}") from None
        try:
            self.data.set_state(state["sampler"])
            rng = self._rng()
            if rng is not None and state.get("dropout_rng"):
                rng.bit_generator.state = state["dropout_rng"]
            self.objective.set_state(state.get("objective"))
            if "schedule" in state:
                schedule = Schedule.from_state(state["schedule"])
                for s in (state["step"], schedule.end - 1, *(seg[0] for seg in schedule.segments)):
                    if not math.isfinite(schedule(s)):  # evaluated once here: bad segments fail now
                        raise ValueError(f"lr {schedule(s)} at step {s}")
                self.schedule = schedule
            skipped = state.get("skipped_batches", 0)
            if not isinstance(skipped, int) or isinstance(skipped, bool) or skipped < 0:
                raise ValueError(f"skipped_batches must be an integer >= 0, got {skipped!r}")
        except (KeyError, ValueError, TypeError, AttributeError, IndexError, OverflowError) as e:
            raise CheckpointError(f"{self.ckpt_link / 'state.json'}: random or schedule state unusable "
                                  f"({e})"[:400]) from None
        self.step = state["step"]
        self.history = list(state.get("history", []))
        self.skipped = skipped
        self.scaler = amp_train.restore_scaler(self.scaler, state.get("amp"))  # [amp #13]

    def save(self) -> Path:
        if self.comm is not None:  # [distributed #14] consolidated on rank 0, every rank waits for it
            from tinylm.distributed.hooks import save_distributed  # noqa: PLC0415

            self.last_saved = save_distributed(self)
            return self.last_saved
        with self.store.masters_in_params():  # [amp #13] a 16-bit run's checkpoint holds the fp32 masters
            self.last_saved = save_checkpoint(self.ckpt_link, self.model, self.opt, self.state(), self.tokenizer,
                                              keep=getattr(self.cfg, "keep_checkpoints", 1))
        return self.last_saved

    # ---- the loop ---------------------------------------------------------------------------
    def _micro_step(self, scale: float, last: bool = True):
        with amp_train.activations(self.policy):  # [amp #13] a 16-bit run's activations in its format
            loss, metrics = self.objective.loss(self.model, self.data.next())
        if loss is None:
            self.skipped += 1
            if self.comm is not None:  # [distributed #14] this rank still joins the collectives
                self.opt.backward(None, last)
            return None, metrics
        if isinstance(loss, float):  # [distributed #14] 0.0: a micro-batch other ranks train on, none of it here
            self.opt.backward(None, last)
            return loss, metrics
        if scale != 1.0:
            loss = loss * scale
        value = None
        if self.scaler is not None:  # [amp #13] fp16: backpropagate loss * S, report the loss itself
            value, loss = loss.item(), loss * self.scaler.scale
        if self.comm is not None:  # [distributed #14] gradient buckets reduced during backward
            self.opt.backward(loss, last)
        else:
            loss.backward()
        return (loss.item() if value is None else value), metrics

    def run(self, stop_at: int | None = None) -> dict:
        """Train until ``stop_at`` (default: the schedule's end). Returns a summary dict."""
        from tqdm import tqdm  # noqa: PLC0415

        cfg = self.cfg
        follow = stop_at is None  # the run ends with its schedule (which replan may lengthen)
        stop_at = self.schedule.end if stop_at is None else stop_at
        # [distributed #14] only rank 0 logs and shows progress
        log = open(self.out / "log.jsonl" if self.is_main else os.devnull, "a", encoding="utf-8")
        bar = tqdm(total=stop_at, initial=self.step, disable=not cfg.progress or not self.is_main, unit="step",
                   dynamic_ncols=True)
        t_start = time.perf_counter()
        t_last, t_first, tok_since, n_done = t_start, t_start, 0, 0
        losses: list[float] = []
        last_val, stopped = None, "max_steps"
        acc = max(1, cfg.grad_accum)
        with _Interrupt() as intr:
            try:
                while self.step < stop_at:
                    lr = self.schedule(self.step)
                    self.opt.zero_grad()
                    loss_sum, metrics, used = 0.0, {}, 0
                    for i in range(acc):
                        lv, m = self._micro_step(1.0 / acc, i == acc - 1)
                        for k, v in m.items():
                            metrics[k] = metrics.get(k, 0.0) + float(v) / acc
                        if lv is not None:
                            loss_sum += lv
                            used += 1
                    if self.comm is not None:  # [distributed #14] the loss and metrics of the global batch
                        from tinylm.distributed.hooks import global_step_stats  # noqa: PLC0415

                        loss_sum, used, metrics = global_step_stats(self.comm, loss_sum, used, acc, metrics)
                    if used == 0:  # nothing in this step trained anything: no update
                        self.step += 1
                        bar.update(1)
                        continue
                    if used < acc:
                        loss_sum *= acc / used  # the mean over the micro-batches that counted
                    if not math.isfinite(loss_sum):
                        stopped = "nan"
                        kept = f"step {self._saved_step()}" if self.ckpt_link.exists() else "none written yet"
                        raise FloatingPointError(
                            f"loss became {loss_sum} at step {self.step}; stopping. The last good checkpoint "
                            f"({self.ckpt_link}, {kept}) is kept; try a lower lr (now {cfg.lr}) or more warmup_steps.")
                    if self.policy.mixed:  # [amp #13] grads rounded to the format, unscaled, clipped; fp16 overflow: skip
                        # [distributed #14] on ranks the optimizer rounds, unscales and clips its range; one agreed decision
                        norm, apply = amp_train.grads_ready(self.store if self.comm is None else self.opt, self.scaler,
                                                            cfg.grad_clip)
                    else:
                        norm, apply = self.opt.clip_grad_norm(cfg.grad_clip), True
                    if apply:
                        self.opt.step(lr)
                    self.step += 1
                    n_done += 1
                    tok_since += getattr(self.data, "tokens_per_batch", 0) * acc
                    losses.append(loss_sum)
                    if n_done == 1:
                        t_first = time.perf_counter()  # the first step includes JIT compiles
                    bar.update(1)
                    if self.step % cfg.log_interval == 0 or self.step == stop_at:
                        now = time.perf_counter()
                        tps = tok_since / max(now - t_last, 1e-9)
                        t_last, tok_since = now, 0
                        rec = {"step": self.step, "loss": loss_sum, "lr": lr, "grad_norm": norm,
                               "tokens_per_s": round(tps, 1), "elapsed_s": round(now - t_start, 2)}
                        rec.update({k: round(v, 6) for k, v in metrics.items()})
                        if self.skipped:
                            rec["skipped_batches"] = self.skipped
                        if self.scaler is not None:  # [amp #13]
                            rec.update(loss_scale=self.scaler.scale, skipped_steps=self.scaler.skipped)
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                        self.history.append({"step": self.step, "train": float(np.mean(losses[-cfg.log_interval:]))}
                                            | {k: v for k, v in metrics.items()})
                        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                    budget_spent = cfg.time_budget > 0 and time.perf_counter() - t_start > cfg.time_budget * 60
                    if self.comm is not None:  # [distributed #14] every rank stops at the same step
                        budget_spent, intr.requested = (bool(x) for x in self.comm.allreduce(
                            [budget_spent, intr.requested], "stop flags") > 0)
                    if self.step % cfg.eval_interval == 0 or self.step == stop_at or budget_spent or intr.requested:
                        if self.replan is not None and follow and not (budget_spent or intr.requested) \
                                and self.step < stop_at:
                            now = time.perf_counter()
                            new_end = self.replan(self, now - t_start, now - t_first, n_done - 1)
                            if new_end is not None and new_end > self.schedule.end:
                                self.schedule.extend(self.step, new_end)
                                cfg.max_steps = stop_at = bar.total = new_end
                        last_val = self._validate(log, losses, bar) if self.evaluate else last_val
                        self.save()
                        self.plot()
                    if budget_spent:
                        stopped = "time_budget"
                        break
                    if intr.requested:
                        stopped = "interrupted"
                        break
            finally:
                if stopped in ("time_budget", "interrupted"):
                    bar.total = self.step  # end the bar where the run ended, not at a far max_steps
                    bar.refresh()
                bar.close()
                log.close()
        elapsed = time.perf_counter() - t_start
        timed = n_done - 1
        tps = timed * getattr(self.data, "tokens_per_batch", 0) * acc / max(time.perf_counter() - t_first, 1e-9) \
            if timed > 0 else 0.0
        return {"steps": self.step, "steps_run": n_done, "stopped": stopped, "train_losses": losses, "val": last_val,
                "elapsed_s": elapsed, "model": self.model, "tokenizer": self.tokenizer,
                "checkpoint": str(self.ckpt_link), "out_dir": str(self.out), "tokens_per_s": tps,
                "skipped_batches": self.skipped}

    def _saved_step(self):
        try:
            return json.loads((self.ckpt_link / "state.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            return "?"

    def _validate(self, log, losses, bar):
        with amp_train.activations(self.policy):  # [amp #13] the model as it trains: activations in its format
            v = float(self.evaluate(self.model))
        if not math.isfinite(v):
            raise FloatingPointError(f"validation loss became {v} at step {self.step}; the last good checkpoint "
                                     f"({self.ckpt_link}) is kept")
        rep = loss_report(v, self.bytes_per_token)
        self.history.append({"step": self.step, "val": v})
        log.write(json.dumps({"step": self.step} | {"val_" + k: x for k, x in rep.items()}) + "\n")
        log.flush()
        recent = losses[-self.cfg.log_interval:]
        head = f"step {self.step:5d} | "
        if recent:
            head += f"train {_fmt(loss_report(float(np.mean(recent)), self.bytes_per_token))} | "
        bar.write(head + f"val {_fmt(rep)}")
        return rep

    def plot(self) -> None:
        from tinylm.train.plots import plot_losses  # noqa: PLC0415

        if not self.is_main:  # [distributed #14]
            return
        plot_losses(self.history, self.out / "loss.png")
