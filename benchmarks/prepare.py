"""Benchmark of ``tinylm prepare``: end-to-end MB/s and peak memory on a real corpus.

    .venv/bin/python benchmarks/prepare.py [--data PATH ...] [--workers 1 2] [--dedup exact near]

Corpus: ``--data``, else the ``.txt`` files in the directory ``$TINYLM_BENCH_DATA`` names (the
team's is tinyshakespeare + the KJV Bible, 5.3 MB: docs/performance.md, "Benchmark corpora")
when it is set and ``--synthetic-mb`` is not given, else a generated stand-in: unique
random-word documents (tests/test_data_support.write_corpus; 32 MiB by default). Each configuration runs
in a fresh subprocess (so Numba caches and peak RSS do not leak between runs) and reports
the wall time of ``prepare`` split by pass, MB/s of input bytes, and the peak RSS of the main
process (``ru_maxrss``); a worker's peak is read from one extra run with spawn-started workers
(forkserver workers are not children of the run, so ``RUSAGE_CHILDREN`` cannot see them). One warm-up run fills
the Numba cache first. A tokenizer trained once (vocab 4096, in the first configuration's
process) is reused by the others so that "tokenizer" time is the BPE training only where noted.

Leaves out: comparisons with other tools (none of datatrove/text-dedup is installed here).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DATA = os.environ.get("TINYLM_BENCH_DATA", "")  # a directory holding the benchmark corpus

CHILD = r'''
import json, resource, sys, time
from tinylm.data import prepare
args = json.loads(sys.argv[1])
t = time.perf_counter()
report = prepare(args["data"], args["out"], args["tokenizer"], workers=args["workers"], dedup=args["dedup"],
                 vocab_size=4096, progress=False, overwrite=True)
wall = time.perf_counter() - t
ru_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
ru_kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"wall": wall, "peak_main_mb": ru_self, "peak_worker_mb": ru_kids, "report": report}))
'''


def run_child(args: dict, start: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TINYLM_MP_START": start}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+")
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--dedup", nargs="+", default=["exact", "near"])
    ap.add_argument("--synthetic-mb", type=int, default=0,
                    help="use a generated corpus of this many MiB instead (also the fallback, 32 MiB)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.data:
            data = a.data
        elif (BENCH_DATA and not a.synthetic_mb
              and (found := [str(p) for p in sorted(Path(BENCH_DATA).glob("*.txt"))])):
            data = found
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            from test_data_support import write_corpus

            write_corpus(tmp / "synthetic", (a.synthetic_mb or 32) << 20, seed=0)
            data = [str(tmp / "synthetic")]
        mb = sum(os.path.getsize(f) for p in data for f in ([p] if os.path.isfile(p) else
                 [os.path.join(r, n) for r, _, ns in os.walk(p) for n in ns])) / 1e6
        print(f"corpus: {', '.join(data)} ({mb:.2f} MB)")
        tok = str(tmp / "out_train" / "tokenizer.json")
        # warm-up (Numba cache) + the run that trains the tokenizer
        run_child({"data": data, "out": str(tmp / "warm"), "tokenizer": None, "workers": 1, "dedup": "exact"})
        r = run_child({"data": data, "out": str(tmp / "out_train"), "tokenizer": None, "workers": 1, "dedup": "exact"})
        rows = [("exact", 1, "trained", "-", r)]
        for dedup in a.dedup:
            for w in a.workers:
                r = run_child({"data": data, "out": str(tmp / f"out_{dedup}_{w}"), "tokenizer": tok,
                               "workers": w, "dedup": dedup})
                rows.append((dedup, w, "given", "forkserver" if w > 1 else "-", r))
        # forkserver workers are not our children, so ru_maxrss cannot see them: one spawn run
        # measures a worker's peak
        w = max(a.workers)
        if w > 1:
            r = run_child({"data": data, "out": str(tmp / "out_spawn"), "tokenizer": tok, "workers": w,
                           "dedup": a.dedup[-1]}, start="spawn")
            rows.append((a.dedup[-1], w, "given", "spawn", r))
        print("\n| dedup | workers | tokenizer | start | MB/s | total s | clean+dedup s | tokenizer s "
              "| tokenize+shards s | peak main MiB | peak worker MiB | docs kept | dup | train tokens |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for dedup, w, how, start, r in rows:
            rep, sec = r["report"], r["report"]["seconds"]
            dups = rep["dedup"]["exact_duplicates"] + rep["dedup"]["near_duplicates"]
            worker = f"{r['peak_worker_mb']:.0f}" if start == "spawn" else "-"
            print(f"| {dedup} | {w} | {how} | {start} | {rep['input']['bytes'] / 1e6 / r['wall']:.2f} | {r['wall']:.2f} "
                  f"| {sec['clean_dedup']:.2f} | {sec['tokenizer']:.2f} | {sec['tokenize_shards']:.2f} "
                  f"| {r['peak_main_mb']:.0f} | {worker} | {rep['kept']['documents']} | {dups} "
                  f"| {rep['split']['train']['tokens']} |")
        print("\nfilters dropped (last run):", rows[-1][4]["report"]["dropped"] or "none")


if __name__ == "__main__":
    main()
