"""Data parallelism on this machine: throughput, all-reduce bandwidth, overlap, memory per stage.

    python benchmarks/distributed.py            (needs the mpi extra: mpi4py + mpich)

1. Config M (6 layers, 6 heads, 384 wide, T=256, V=8192, global batch 8, float32): 2 ranks x
   1 thread against 1 rank x 2 threads, tokens/s of the same global batches.
2. All-reduce bus bandwidth (2 (N-1)/N bytes / time, the NCCL-tests convention) at 2 ranks
   against this machine's memory-copy bandwidth (np.copyto, read + write counted).
3. The M step at 2 ranks with the gradient buckets reduced during backward (overlap) and all
   after backward (no overlap).
4. Config L (GPT-2 small, T=256, global batch 4): per-rank bytes of parameters, gradients and
   optimizer state read from the buffers, and peak RSS per rank, at ZeRO stages 0-3 on 2 ranks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
M = ["--layers", "6", "--heads", "6", "--embd", "384", "--block", "256", "--vocab", "8192", "--global-batch", "8",
     "--dtype", "float32", "--accum", "1", "--lr", "1e-3", "--clip", "1.0", "--bucket-mb", "4"]
L = ["--layers", "12", "--heads", "12", "--embd", "768", "--block", "256", "--vocab", "50304",
     "--global-batch", "4", "--dtype", "float32", "--accum", "1", "--lr", "1e-4", "--clip", "1.0", "--bucket-mb", "25"]


def selftest(n, threads, args, out):
    env = dict(os.environ, TINYLM_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "tinylm.distributed.selftest", "--out", str(out), *args]
    if n > 1:
        cmd = [MPIEXEC, "-n", str(n), *cmd]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return json.loads((Path(out) / "result.json").read_text())


_BW = r"""
import sys, time, numpy as np
from tinylm.distributed import world
c = world()
for mb in (1, 16, 64):
    a = np.ones(mb * 2**20 // 4, dtype=np.float32)
    c.wait([c.iallreduce(a)])
    best = 1e9
    for _ in range(5):
        c.barrier(); t = time.perf_counter(); c.wait([c.iallreduce(a)]); best = min(best, time.perf_counter() - t)
    if c.rank == 0:
        print(mb, best, flush=True)
c.done()
"""


def allreduce_bandwidth():
    env = dict(os.environ, TINYLM_NUM_THREADS="1")
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", _BW], env=env, check=True, capture_output=True,
                       text=True)
    rows = []
    for line in p.stdout.split("\n"):
        if line.strip():
            mb, t = line.split()
            nbytes = int(mb) * 2**20
            rows.append((int(mb), float(t), 2 * (2 - 1) / 2 * nbytes / float(t) / 1e9))
    a = np.ones(256 * 2**20 // 4, dtype=np.float32)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    return rows, 2 * a.nbytes / best / 1e9


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="1234", help="which of the four to run (default all)")
    sections = ap.parse_args().sections
    print(f"machine: {os.cpu_count()} logical CPUs; load before: {os.getloadavg()}")
    tmp = Path(tempfile.mkdtemp(prefix="tinylm-dist-bench-"))
    steps = ["--steps", "6"]
    if "4" in sections and set(sections) == {"4"}:
        return memory(tmp)
    one = selftest(1, 2, M + steps, tmp / "m1")
    two = selftest(2, 1, M + steps, tmp / "m2")
    print("\n1. config M, same global batch (8 x 256 tokens), tokens/s after the first step")
    print("| run | tokens/s | first loss |\n|---|---|---|")
    print(f"| 1 rank x 2 threads | {one['tokens_per_s']:,.0f} | {one['losses'][0]:.4f} |")
    print(f"| 2 ranks x 1 thread | {two['tokens_per_s']:,.0f} | {two['losses'][0]:.4f} |")
    print(f"ratio 2x1 / 1x2: {two['tokens_per_s'] / one['tokens_per_s']:.2f}")

    rows, copy_bw = allreduce_bandwidth()
    print("\n2. all-reduce (float32, sum) at 2 ranks, best of 5")
    print("| MB | ms | bus GB/s | / memory copy |\n|---|---|---|---|")
    for mb, t, bw in rows:
        print(f"| {mb} | {t * 1e3:.2f} | {bw:.2f} | {bw / copy_bw:.2f} |")
    print(f"memory copy (np.copyto 256 MB, read + write): {copy_bw:.2f} GB/s")

    no = selftest(2, 1, M + steps + ["--no-overlap"], tmp / "m2no")
    print("\n3. config M, 2 ranks x 1 thread, ZeRO 0")
    print("| buckets reduced | tokens/s | ms/step |\n|---|---|---|")
    for name, r in (("during backward (overlap)", two), ("after backward", no)):
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {8 * 256 / r['tokens_per_s'] * 1e3:,.0f} |")

    memory(tmp)


def memory(tmp):
    print("\n4. config L (124M parameters, fp32), 2 ranks x 1 thread, 3 steps per stage")
    print("| zero | params MB | grads MB | optimizer MB | bytes/param | paper (fp32) | peak RSS MiB rank 0 | rank 1 |")
    print("|---|---|---|---|---|---|---|---|")
    paper = {0: 16, 1: 8 + 8 / 2, 2: 4 + 12 / 2, 3: 16 / 2}
    for z in range(4):
        r = selftest(2, 1, L + ["--steps", "3", "--zero", str(z)], tmp / f"l{z}")
        nb = r["nbytes"]
        print(f"| {z} | {nb['params'] / 1e6:,.1f} | {nb['grads'] / 1e6:,.1f} | {nb['optimizer'] / 1e6:,.1f} | "
              f"{nb['total'] / r['n_params']:.2f} | {paper[z]:.0f} | {r['peak_rss'][0] / 2**20:,.0f} | "
              f"{r['peak_rss'][1] / 2**20:,.0f} |")


if __name__ == "__main__":
    main()
