"""Context study: the same GPT trained at contexts 256, 512 and 1024 on the same corpus and
token budget, compared side by side.

Every model has the same shape and sees the same number of training tokens: tokens per step
is fixed, so the batch shrinks as the context grows (B = tokens_per_step / T). Reported for
each context:

- validation perplexity and bits per byte at the model's own context (tinylm.eval.ppl on the
  built-in corpus's held-out files, non-overlapping windows of T and sliding windows of
  stride T / 2);
- loss by position within the window (mean over the non-overlapping windows): what the extra
  context buys at each position;
- training tokens/s and the peak memory (RSS growth over the process before the step) of a
  training step and of an inference forward (batch 1, one full window), each measured in a
  fresh process for the flash and the plain attention kernels (kernels/lab/attention.py), and
  the peak memory of the attention op alone (forward + backward, batch 1): flash keeps O(T)
  extra memory per head, plain materialises T x T scores and probabilities.

Outputs in ``out_dir``: ``T256/``.. (each model's run), ``study.json``, ``table.md``,
``loss_by_position.png``, ``memory.png``. A model whose run already reached its last step is
reused, so an interrupted study continues. The default settings finish in about 30 minutes on
2 cores; ``quick`` is a small setting for a smoke run (a few minutes).

Leaves out: matching compute instead of tokens (a longer context costs more per token), any
learning-rate retuning per context.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np


@dataclass
class StudySettings:
    contexts: tuple = (256, 512, 1024)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    vocab_size: int = 2048
    tokens_per_step: int = 4096   # the same for every context: B = tokens_per_step / T
    steps: int = 1250             # 5.1M training tokens per model (the default run: ~30 min on 2 cores)
    lr: float = 3e-3
    val_tokens: int = 120_000     # held-out tokens scored per model (the built-in corpus has 110,050)
    kernels: tuple = ("cpu_flash", "cpu_plain")
    measure_steps: int = 2        # timed training steps per kernel and context (after one untimed)
    corpus_mb: float = 6.0
    seed: int = 1337
    extra: dict = field(default_factory=dict)


QUICK = dict(n_layer=2, n_head=2, n_embd=64, tokens_per_step=2048, steps=40, val_tokens=6000, measure_steps=1,
             corpus_mb=2.0)


def attention_variants() -> dict:
    """op -> {variant: function} of the attention family, the lab's study variants included."""
    try:
        from kernels.lab.attention import VARIANTS  # noqa: PLC0415
    except ImportError:  # an older layout: every variant in kernels/attention.py
        from kernels.attention import VARIANTS  # noqa: PLC0415
    return VARIANTS


def use_attention(name: str) -> None:
    """Make ``name`` the cpu attention for this process (the family is loaded first, so its own
    registration cannot overwrite this one later)."""
    import kernels  # noqa: PLC0415

    v = attention_variants()
    for op in ("attention_fwd", "attention_bwd"):
        if name not in v[op]:
            raise ValueError(f"no attention variant {name!r}; there are {sorted(v[op])}")
        kernels.available(op)
        kernels.register(op, "cpu")(v[op][name])


# ---- measurements, each in a fresh process ------------------------------------------------------

def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field_name} in /proc/self/status")


def _reset_peak() -> int:
    """Reset the peak RSS to the current one (Linux clear_refs 5) -> current RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def measure(spec: dict) -> dict:
    """In this process: {"what": "train" | "infer" | "attention", "T", "kernel", model shape...}
    -> tokens/s and the peak RSS growth in MiB over the state just before the measured work."""
    import tinylm  # noqa: PLC0415
    from tinylm.models import GPT, GPTConfig  # noqa: PLC0415

    use_attention(spec["kernel"])
    T, B, rng = spec["T"], spec.get("B", 1), np.random.default_rng(0)
    if spec["what"] == "attention":
        from tinylm import functional as F  # noqa: PLC0415

        NH, hs = spec["n_head"], spec["n_embd"] // spec["n_head"]
        small = [tinylm.tensor(rng.standard_normal((1, NH, 8, hs)).astype(np.float32), requires_grad=True) for _ in range(3)]
        F.causal_self_attention(*small).sum().backward()  # kernels loaded before the baseline
        qkv = [tinylm.tensor(rng.standard_normal((1, NH, T, hs)).astype(np.float32), requires_grad=True) for _ in range(3)]
        base = _reset_peak()
        t0 = time.perf_counter()
        F.causal_self_attention(*qkv).sum().backward()
        dt = time.perf_counter() - t0
        io_mib = 7 * NH * T * hs * 4 / 2**20  # q, k, v, out and three gradients
        return {"seconds": dt, "peak_mib": (_status_kib("VmHWM") - base) / 1024, "io_mib": io_mib}
    from tinylm.optim import AdamW, ParamStore  # noqa: PLC0415

    cfg = GPTConfig(n_layer=spec["n_layer"], n_head=spec["n_head"], n_embd=spec["n_embd"], block_size=T,
                    vocab_size=spec["vocab_size"])
    model = GPT(cfg, seed=0)
    x = rng.integers(0, cfg.vocab_size, (B, T))
    if spec["what"] == "infer":
        model.eval()
        with tinylm.no_grad():
            model(x[:, :8])
            base = _reset_peak()
            t0 = time.perf_counter()
            model(x)
            dt = time.perf_counter() - t0
        return {"seconds": dt, "tokens_per_s": B * T / dt, "peak_mib": (_status_kib("VmHWM") - base) / 1024}
    store = ParamStore.for_model(model, 0.1)
    opt = AdamW(store, lr=1e-4)

    def step(xb):
        store.zero_grad()
        _, loss = model(xb[:, :-1], xb[:, 1:], return_logits=False)
        loss.backward()
        opt.step()

    y = rng.integers(0, cfg.vocab_size, (B, T + 1))
    step(y[:1, :9])  # kernels loaded, optimizer moments allocated
    base = _reset_peak()
    step(y)  # untimed: the first full-size step allocates what later steps reuse
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        step(y)
    dt = (time.perf_counter() - t0) / spec["steps"]
    return {"seconds": dt, "tokens_per_s": B * T / dt, "peak_mib": (_status_kib("VmHWM") - base) / 1024}


def _measure_in_child(spec: dict) -> dict:
    p = subprocess.run([sys.executable, "-m", "tinylm.eval.context_study", "--measure", json.dumps(spec)],
                       capture_output=True, text=True, env=dict(os.environ))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"measurement {spec} failed (exit {p.returncode}): {p.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


# ---- the study ------------------------------------------------------------------------------------

def loss_by_position(model, tokens, keep, window: int, batch_size: int = 4) -> np.ndarray:
    """Mean loss (nats) at each position 0..window-1 over the full non-overlapping windows
    (separator targets left out)."""
    from tinylm.eval.common import logsumexp_rows  # noqa: PLC0415
    from tinylm.tensor import no_grad  # noqa: PLC0415

    n_win = (len(tokens) - 1) // window
    tot, cnt = np.zeros(window), np.zeros(window)
    with no_grad():
        for w0 in range(0, n_win, batch_size):
            ws = range(w0, min(n_win, w0 + batch_size))
            x = np.stack([tokens[w * window:(w + 1) * window] for w in ws])
            y = np.stack([tokens[w * window + 1:(w + 1) * window + 1] for w in ws])
            k = np.stack([keep[w * window + 1:(w + 1) * window + 1] for w in ws])
            logits = model(x)[0].values()
            for r in range(len(x)):
                z = logits[r].astype(np.float64)
                nll = logsumexp_rows(z) - z[np.arange(window), y[r]]
                tot += np.where(k[r], nll, 0)
                cnt += k[r]
    return tot / np.maximum(cnt, 1)


def _train_one(s: StudySettings, T: int, out: Path) -> dict:
    from tinylm.train import TrainConfig, train  # noqa: PLC0415

    run = out / f"T{T}"
    state = run / "checkpoint" / "state.json"
    if state.is_file() and json.loads(state.read_text()).get("step") == s.steps and (run / "summary.json").is_file():
        print(f"context {T}: reusing {run} (trained to step {s.steps})", flush=True)
        return json.loads((run / "summary.json").read_text())
    B = s.tokens_per_step // T
    cfg = TrainConfig(out_dir=str(run), block_size=T, batch_size=B, n_layer=s.n_layer, n_head=s.n_head,
                      n_embd=s.n_embd, vocab_size=s.vocab_size, max_steps=s.steps, lr=s.lr, min_lr=s.lr / 10,
                      warmup_steps=max(1, min(100, s.steps // 10)), eval_interval=s.steps, eval_batches=2,
                      log_interval=max(1, s.steps // 20), sample_tokens=0, progress=False, corpus_mb=s.corpus_mb,
                      seed=s.seed)
    print(f"context {T}: training {s.steps} steps of {B} x {T} tokens", flush=True)
    r = train(cfg, overwrite=True)
    summ = {"steps": r["steps"], "tokens_per_s": r["tokens_per_s"], "elapsed_s": r["elapsed_s"], "batch": B,
            "final_val": r.get("val")}
    (run / "summary.json").write_text(json.dumps(summ, default=float) + "\n")
    return summ


def run_study(s: StudySettings, out_dir) -> dict:
    import tinylm  # noqa: PLC0415
    from tinylm.eval import ppl  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for T in s.contexts:
        if s.tokens_per_step % T or T % 2:
            raise ValueError(f"tokens_per_step={s.tokens_per_step} must be a multiple of every context (got {T})")
    t0 = time.perf_counter()
    texts, names = ppl.builtin_heldout(s.corpus_mb)
    rows, positions = [], {}
    for T in s.contexts:
        summ = _train_one(s, T, out)
        model, tok = tinylm.load(out / f"T{T}" / "checkpoint")
        tokens, keep, n_bytes = ppl.stream_of_texts(tok, texts)
        n = min(len(tokens), s.val_tokens + 1)
        nb = len(tok.decode_bytes([int(t) for t, k in zip(tokens[:n], keep[:n]) if k]))
        pr = ppl.perplexity(model, tokens[:n], keep[:n], nb, window=T, stride=T // 2, batch_size=4)
        positions[T] = loss_by_position(model, tokens[:n], keep[:n], T)
        row = {"context": T, "batch": summ["batch"], "train_tokens_per_s": summ["tokens_per_s"],
               "train_minutes": summ["elapsed_s"] / 60, "val_ppl": pr["non_overlapping"]["perplexity"],
               "val_bpb": pr["non_overlapping"]["bits_per_byte"], "val_ppl_sliding": pr["sliding"]["perplexity"],
               "val_bpb_sliding": pr["sliding"]["bits_per_byte"], "val_tokens": pr["sliding"]["tokens_scored"],
               "tokenizer": tok.fingerprint()[:12]}
        shape = {"n_layer": s.n_layer, "n_head": s.n_head, "n_embd": s.n_embd, "vocab_size": tok.vocab_size}
        for k in s.kernels:
            tr = _measure_in_child({"what": "train", "T": T, "B": summ["batch"], "kernel": k, "steps": s.measure_steps, **shape})
            inf = _measure_in_child({"what": "infer", "T": T, "B": 1, "kernel": k, **shape})
            att = _measure_in_child({"what": "attention", "T": T, "kernel": k, **shape})
            row[k] = {"train_tokens_per_s": tr["tokens_per_s"], "train_peak_mib": tr["peak_mib"],
                      "infer_peak_mib": inf["peak_mib"], "infer_tokens_per_s": inf["tokens_per_s"],
                      "attention_peak_mib": att["peak_mib"], "attention_io_mib": att["io_mib"]}
        rows.append(row)
        print(f"context {T}: val ppl {row['val_ppl']:.3f}, {row['val_bpb']:.4f} bits/byte", flush=True)
    res = {"settings": asdict(s), "data": {"validation": "built-in corpus, held-out files", "files": len(names),
                                           "tokens_per_model": s.tokens_per_step * s.steps},
           "results": {"rows": rows, "loss_by_position": {str(T): v.tolist() for T, v in positions.items()}},
           "seconds": time.perf_counter() - t0}
    (out / "study.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    (out / "table.md").write_text(table(rows, s.kernels) + "\n")
    plot(rows, positions, s.kernels, out)
    print(table(rows, s.kernels))
    print(f"\n{out / 'study.json'}, {out / 'table.md'}, {out / 'loss_by_position.png'}, {out / 'memory.png'}")
    return res


def table(rows: list[dict], kernels: tuple) -> str:
    head = ["context", "batch", "val ppl", "val bits/byte", "sliding ppl", "train tok/s (run)"]
    for k in kernels:
        head += [f"{k} train tok/s", f"{k} train peak MiB", f"{k} infer peak MiB", f"{k} attention MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["context"], r["batch"], f"{r['val_ppl']:.3f}", f"{r['val_bpb']:.4f}", f"{r['val_ppl_sliding']:.3f}",
                 f"{r['train_tokens_per_s']:,.0f}"]
        for k in kernels:
            m = r[k]
            cells += [f"{m['train_tokens_per_s']:,.0f}", f"{m['train_peak_mib']:.0f}", f"{m['infer_peak_mib']:.1f}",
                      f"{m['attention_peak_mib']:.1f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def plot(rows, positions, kernels, out: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4))
    for T, v in positions.items():
        v = np.asarray(v)
        edges = np.unique(np.round(np.geomspace(1, len(v) + 1, 25)).astype(int)) - 1  # log-spaced buckets
        xs = [np.mean(np.arange(a, b)) + 1 for a, b in zip(edges[:-1], edges[1:])]
        ax.plot(xs, [v[a:b].mean() for a, b in zip(edges[:-1], edges[1:])], marker=".", label=f"context {T}")
    ax.set_xscale("log")
    ax.set_xlabel("position in the window (log-spaced buckets)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("loss by position")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_by_position.png", dpi=110)
    plt.close(fig)
    Ts = [r["context"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("train_peak_mib", "infer_peak_mib", "attention_peak_mib"),
                              ("training step", "inference forward (batch 1)", "attention fwd+bwd alone (batch 1)")):
        for k in kernels:
            ax.plot(Ts, [r[k][key] for r in rows], marker="o", label=k)
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ts, [str(t) for t in Ts])
        ax.set_xlabel("context T")
        ax.set_ylabel("peak RSS growth (MiB)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)


def replot(out_dir) -> None:
    """Redraw the plots and the table from ``study.json`` (no training, no measurement)."""
    out = Path(out_dir)
    res = json.loads((out / "study.json").read_text())
    rows, kernels = res["results"]["rows"], tuple(res["settings"]["kernels"])
    plot(rows, {int(T): v for T, v in res["results"]["loss_by_position"].items()}, kernels, out)
    (out / "table.md").write_text(table(rows, kernels) + "\n")


def run_from_args(args) -> dict:
    s = StudySettings(**QUICK) if args.quick else StudySettings()
    over = {"contexts": tuple(args.contexts) if args.contexts else None, "steps": args.steps,
            "tokens_per_step": args.tokens_per_step}
    s = replace(s, **{k: v for k, v in over.items() if v is not None})
    res = run_study(s, args.out_dir)
    return res


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print("RESULT " + json.dumps(measure(json.loads(sys.argv[2]))))
    else:
        print("usage: tinylm eval --task context-study [--quick] (this module's --measure is its worker)")
        sys.exit(2)
