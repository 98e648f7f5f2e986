"""Runs one chapter's code blocks in order, in one namespace, and records what each printed.

Started by build.py in a fresh process per chapter (``python _runner.py JOB.json``), with the
chapter's work directory as the current directory. JOB.json: ``{"chapter", "blocks": [{"lang",
"code", "line"}], "quick", "fig_dir", "result"}``. The result JSON it writes: one entry per block
(``stdout``, ``figures``, ``seconds``), the ``quotes`` (name -> text, block), and ``error`` (the
failing block's index and traceback) if one failed; the blocks after a failure do not run.

A block sees, besides what earlier blocks defined:
- ``QUICK``: True in the quick build (tiny settings; every block still runs);
- ``GUIDE_DIR``: the chapters' directory (its ``data/`` and ``runs/`` hold inputs and recorded
  long runs, which are part of each chapter's cache key);
- ``figure(fig, caption)``: saves a matplotlib figure as the next numbered figure, shown
  under the block;
- ``quote(name, value)``: returns ``str(value)`` and records it; the prose's ``{{name}}``
  becomes that text. The text must also appear in what the block prints (the build checks),
  so the prose can only quote what the code printed.
``sh`` blocks run with bash; their output (stdout and stderr) is the block's output.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    fig_dir = Path(job["fig_dir"])
    fig_dir.mkdir(parents=True, exist_ok=True)
    results, quotes, error = [], {}, None
    current: dict = {}

    def figure(fig, caption: str) -> None:
        n = sum(len(r["figures"]) for r in results) + len(current["figures"]) + 1
        name = f"fig{n}.png"
        fig.savefig(fig_dir / name, dpi=130, bbox_inches="tight")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        plt.close(fig)
        current["figures"].append({"file": name, "caption": caption})

    def quote(name: str, value) -> str:
        if name in quotes:
            raise ValueError(f"quote({name!r}): already quoted by block {quotes[name]['block'] + 1}")
        text = str(value)
        quotes[name] = {"text": text, "block": len(results)}
        return text

    os.environ["TINYLM_GUIDE_QUICK"] = "1" if job["quick"] else "0"
    os.environ.setdefault("MPLBACKEND", "Agg")
    ns = {"__name__": "__guide__", "QUICK": bool(job["quick"]), "figure": figure, "quote": quote,
          "GUIDE_DIR": Path(os.environ.get("TINYLM_GUIDE_DIR", Path(__file__).resolve().parent))}
    for i, block in enumerate(job["blocks"]):
        current = {"stdout": "", "figures": [], "seconds": 0.0}
        t0 = time.perf_counter()
        if block["lang"] == "sh":
            p = subprocess.run(["bash", "-eo", "pipefail", "-c", block["code"]], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
            current["stdout"] = p.stdout
            if p.returncode:
                error = {"block": i, "traceback": f"exit status {p.returncode}\n{p.stdout[-4000:]}"}
        else:
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    # padded so a traceback names the line in the chapter's file
                    exec(compile("\n" * block["line"] + block["code"], f"{job['chapter']}.md", "exec"), ns)  # noqa: S102
            except BaseException:  # noqa: BLE001 - any failure of a block fails the build, with its traceback
                error = {"block": i, "traceback": traceback.format_exc()}
            current["stdout"] = buf.getvalue()
        current["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(current)
        if error:
            break
    for name, q in quotes.items():
        if error is None and q["text"] not in results[q["block"]]["stdout"]:
            error = {"block": q["block"], "traceback": f"quote({name!r}) = {q['text']!r} is not in what the block "
                                                      f"printed: the prose may only quote printed output"}
    Path(job["result"]).write_text(json.dumps({"blocks": results, "quotes": quotes, "error": error}),
                                   encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
