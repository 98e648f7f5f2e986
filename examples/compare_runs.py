"""Compare training runs: their validation losses as a table, their curves on one plot.

    python examples/compare_runs.py fp32=runs/fp32 bf16=runs/bf16 fp16=runs/fp16 --plot runs.png

Each argument is ``label=OUT_DIR`` (or just ``OUT_DIR``, labelled by its name), where OUT_DIR is
what ``tinylm train --out`` wrote; its ``log.jsonl`` is read (one JSON object per line: train
lines carry ``loss``, validation lines ``val_loss``). The table has one row per run: the
validation loss at each validation step the runs share, and the last one's difference from the
first run's, in percent. The plot draws each run's training loss (thin: a running mean of 10 log
lines) and validation loss (dots) in one colour, and the validation losses of the second half
zoomed beside them, so runs that should agree can be seen to.

Used for the README's mixed-precision comparison (the same default run in fp32, bf16 with and
without master weights, and fp16). A malformed line is reported with its file and line number.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_log(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, val): lists of (step, loss) from a tinylm log.jsonl."""
    train, val = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if "val_loss" in rec:
                    val.append((int(rec["step"]), float(rec["val_loss"])))
                elif "loss" in rec:
                    train.append((int(rec["step"]), float(rec["loss"])))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a tinylm log line ({e})") from None
    return train, val


def table(runs: dict[str, tuple[list, list]]) -> str:
    """Markdown table of validation loss at the steps every run validated."""
    shared = sorted(set.intersection(*(set(s for s, _ in val) for _, val in runs.values())))
    if not shared:
        raise ValueError("the runs share no validation step")
    base = dict(next(iter(runs.values()))[1])[shared[-1]]
    head = "| run | " + " | ".join(f"val at {s}" for s in shared) + f" | vs {next(iter(runs))} |"
    lines = [head, "|" + "---|" * (len(shared) + 2)]
    for i, (name, (_, val)) in enumerate(runs.items()):
        v = dict(val)
        diff = "-" if i == 0 else f"{100 * (v[shared[-1]] - base) / base:+.2f}%"
        lines.append(f"| {name} | " + " | ".join(f"{v[s]:.4f}" for s in shared) + f" | {diff} |")
    return "\n".join(lines)


def plot(runs: dict[str, tuple[list, list]], path: Path, title: str, smooth: int = 10) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for i, (name, (train, val)) in enumerate(runs.items()):
        color = f"C{i}"
        if len(train) >= smooth:  # one batch's loss is noise: a running mean over `smooth` log lines
            steps, losses = zip(*train)
            mean = [sum(losses[j - smooth + 1:j + 1]) / smooth for j in range(smooth - 1, len(losses))]
            ax.plot(steps[smooth - 1:], mean, color=color, lw=0.9, alpha=0.6)
        for a in (ax, zoom):
            if val:
                a.plot(*zip(*val), "o-", color=color, lw=1.5, ms=3.5, label=f"{name} (validation)")
    last = [v[-1][1] for _, v in runs.values() if v]
    if last:  # the right panel: the second half of training, where the runs must agree
        steps = max(s for _, v in runs.values() for s, _ in v)
        zoom.set_xlim(steps / 2, steps * 1.02)
        zoom.set_ylim(min(last) - 0.25, max(last) + 0.35)
        zoom.set_title("validation, second half (zoomed)")
    for a in (ax, zoom):
        a.set_xlabel("step")
        a.set_ylabel("loss (nats per token)")
        a.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="[label=]OUT_DIR")
    ap.add_argument("--plot", metavar="PNG", help="write the curves here")
    ap.add_argument("--title", default="training and validation loss")
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.runs:
        label, _, d = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
        log = Path(d) / "log.jsonl"
        if not log.is_file():
            print(f"compare_runs: {log}: no such file (is {d} a tinylm train --out directory?)", file=sys.stderr)
            return 2
        try:
            runs[label] = read_log(log)
        except ValueError as e:
            print(f"compare_runs: {e}", file=sys.stderr)
            return 2
    try:
        print(table(runs))
    except ValueError as e:
        print(f"compare_runs: {e}", file=sys.stderr)
        return 2
    if args.plot:
        plot(runs, Path(args.plot), args.title)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
