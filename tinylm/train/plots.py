"""Loss curves as PNG files (matplotlib, no display needed)."""
from __future__ import annotations

import os
from pathlib import Path


def plot_losses(history: list[dict], path: Path, title: str = "tinylm training loss") -> None:
    """Train and validation loss against step; written to a temporary file and renamed."""
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
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
