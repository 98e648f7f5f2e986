"""Streaming: preparing a corpus several times larger than a memory budget keeps the peak RSS
growth within that budget. Measured in a fresh subprocess with ``ru_maxrss``: a warm-up run on
a small corpus sets the baseline (imports, Numba caches, tokenizer), then the peak after the
big run is compared with it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_data_support import write_corpus
from tinylm.tokenizer import BPETokenizer

SCRIPT = r'''
import json, resource, sys
from tinylm.data import prepare

small, big, work = sys.argv[1:4]
peak_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
kw = dict(progress=False, dedup="exact", shard_tokens=1 << 18, batch_bytes=1 << 18, workers=1)
prepare([small], work + "/warm", work + "/tok.json", **kw)
base = peak_mb()
report = prepare([big], work + "/big", work + "/tok.json", **kw)
print(json.dumps({"base_mb": base, "peak_mb": peak_mb(), "bytes": report["input"]["bytes"],
                  "kept": report["kept"]["documents"]}))
'''

BUDGET_MB = 12


@pytest.mark.slow
def test_peak_rss_stays_within_budget_on_a_corpus_4x_larger(tmp_path):
    small = tmp_path / "small"
    big = tmp_path / "big"
    write_corpus(small, 3 << 20, seed=0)
    size = write_corpus(big, 4 * BUDGET_MB << 20, seed=1)
    work = tmp_path / "work"
    work.mkdir()
    # trained here, not in the measured process: training's own peak would hide the runs'
    sample = (small / "part000.txt").read_text(encoding="utf-8")[:200_000]
    BPETokenizer().train([sample], 512, progress=False).save(work / "tok.json")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(small), str(big), str(work)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["bytes"] == size >= 4 * BUDGET_MB << 20 and r["kept"] > 1000
    growth = r["peak_mb"] - r["base_mb"]
    print(f"corpus {size / 2**20:.1f} MiB, baseline peak {r['base_mb']:.1f} MiB, growth {growth:.1f} MiB")
    assert growth < BUDGET_MB, r
