"""Benchmark: tinylm's BPE trainer and encoder against HF ``tokenizers`` and ``tiktoken``.

Everything is measured in this one run, on this machine, and printed as ratios (never typed-in
numbers). Rows:

- train time, vocab 4096 on tinyshakespeare (1.1 MB) and vocab 32768 on ~12 MB of Python
  standard-library source (gathered from the running interpreter, one document per file):
  tinylm vs HF ``train_from_iterator`` (ByteLevel, add_prefix_space=False, all 256 bytes) with
  RAYON_NUM_THREADS=1 and =2, each HF run in a fresh subprocess; the merges are compared too.
  tinylm's time is the second call in this process (JIT cache loaded); the first call's
  time, and a fresh process's, are printed separately (the user's first-run cost).
- encode throughput (MB/s), one call over the whole corpus, one thread: tinylm vs tiktoken built
  from the same vocab, best of 3; ids compared.
- peak RSS of ``tinylm tokenizer train`` streaming a file from disk, for a file of 1x and 4x the
  stdlib corpus: bounded memory means the second is not ~4x the first.

Usage: ``.venv/bin/python benchmarks/tokenizer.py [--quick] [--data tinyshakespeare.txt]``
(quick: smaller corpora). HF tokenizers and tiktoken are optional; their rows are skipped when
they are missing.
Data: ``--data``, else ``$TINYLM_BENCH_DATA/tinyshakespeare.txt`` when that variable names a
directory holding it, else a generated stand-in of the same size (the corpus:
docs/performance.md, "Benchmark corpora").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

BENCH_DATA = os.environ.get("TINYLM_BENCH_DATA", "")  # a directory holding the benchmark corpus
SHAKESPEARE = os.path.join(BENCH_DATA, "tinyshakespeare.txt") if BENCH_DATA else ""
TABLE: list[str] = []  # markdown rows for the README, printed at the end

HF_SCRIPT = r"""
import json, sys, time
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
docs = json.load(open(sys.argv[1], encoding="utf-8"))
hf = Tokenizer(models.BPE())
hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tr = trainers.BpeTrainer(vocab_size=int(sys.argv[2]), show_progress=False, special_tokens=[],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
t = time.perf_counter()
hf.train_from_iterator(docs, tr)
dt = time.perf_counter() - t
m = json.loads(hf.to_str())["model"]["merges"]
m = [x if isinstance(x, list) else x.split(" ") for x in m]
json.dump({"seconds": dt, "merges": m}, open(sys.argv[3], "w"))
"""

# Peak RSS from /proc's VmHWM: ru_maxrss survives exec on Linux, so a child started by a large
# parent reports the parent's size (this benchmark first printed 494 MiB that way; VmHWM: ~200).
RSS_SCRIPT = r"""
import resource, sys, time
from tinylm.cli import main
t = time.perf_counter()
rc = main(["tokenizer", "train", "--data", sys.argv[1], "--vocab-size", sys.argv[2], "--out", sys.argv[3], "--no-progress"])
dt = time.perf_counter() - t
try:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    peak = int(hwm) / 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(dt, peak)
"""


def stdlib_docs(max_bytes: int) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out, n = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "site-packages")
        for f in sorted(filenames):
            if f.endswith(".py"):
                try:
                    s = open(os.path.join(dirpath, f), encoding="utf-8").read()
                except (UnicodeDecodeError, OSError):
                    continue
                out.append(s)
                n += len(s.encode())
                if n >= max_bytes:
                    return out
    return out


def shakespeare(quick: bool, path: str = "") -> list[str]:
    path = path or SHAKESPEARE
    if path and os.path.exists(path):
        text = open(path, encoding="utf-8").read()
    else:  # stand-in: stdlib docstrings-ish prose of the same size
        text = "".join(stdlib_docs(1_100_000))
    return [text[:300_000] if quick else text]


def hf_train(src, vocab, threads, tmp):
    """HF's training time and merges, in a fresh process with ``threads`` Rayon threads."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return None
    out = os.path.join(tmp, "hf.json")
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, "-c", HF_SCRIPT, src, str(vocab), out], check=True, env=env)
    return json.load(open(out))


def bench_train(name, docs, vocab, tmp):
    from tinylm.tokenizer import BPETokenizer
    from tinylm.tokenizer.gpt2 import token_to_str

    mb = sum(len(d.encode()) for d in docs) / 1e6
    t = time.perf_counter()
    tok = BPETokenizer().train(docs, vocab, special_tokens=(), progress=False)
    first = time.perf_counter() - t
    t = time.perf_counter()
    tok = BPETokenizer().train(docs, vocab, special_tokens=(), progress=False)
    ours = time.perf_counter() - t
    print(f"\ntrain {name} ({mb:.1f} MB, {len(docs)} docs), vocab {vocab}: tinylm {ours:.2f} s "
          f"(first call in this process {first:.2f} s)")
    merges = [[token_to_str(tok.token_bytes(a)), token_to_str(tok.token_bytes(b))] for a, b in tok.merges]
    src = os.path.join(tmp, "docs.json")
    with open(src, "w", encoding="utf-8") as f:
        json.dump(docs, f)
    for threads in (1, 2):
        r = hf_train(src, vocab, threads, tmp)
        if r is None:
            print("  HF tokenizers not installed: no comparison")
            break
        diff = next((i for i, (x, y) in enumerate(zip(r["merges"], merges)) if x != y), None)
        if diff is None and len(r["merges"]) != len(merges):
            diff = min(len(merges), len(r["merges"]))
        same = "identical merges" if diff is None else f"MERGES DIFFER, first at merge {diff}"
        print(f"  HF {threads} thread{'s' if threads > 1 else ''}: {r['seconds']:.2f} s -> ratio tinylm/HF = "
              f"{ours / r['seconds']:.2f} ({same})")
        TABLE.append(f"| train {name}, vocab {vocab} | tinylm {ours:.2f} s | HF {threads} thread(s) {r['seconds']:.2f} s "
                     f"| {ours / r['seconds']:.2f} | {same} |")
    return tok


def bench_encode(name, docs, tok):
    text = "".join(docs)
    mb = len(text.encode()) / 1e6
    tok.encode(text[:1000])
    best = min(_timed(lambda: tok.encode(text, allowed_special="none")) for _ in range(3))
    ids = tok.encode(text, allowed_special="none")
    line = f"encode {name} ({mb:.1f} MB, vocab {tok.vocab_size}): tinylm {mb / best:.1f} MB/s"
    try:
        import tiktoken
    except ImportError:
        print(line + " (tiktoken not installed)")
        return
    from tinylm.tokenizer import GPT2_PATTERN

    ranks = {tok.token_bytes(i): i for i in range(tok.vocab_size) if i not in tok.special_tokens.values()}
    enc = tiktoken.Encoding("bench", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    enc.encode_ordinary(text[:1000])
    tbest = min(_timed(lambda: enc.encode_ordinary(text)) for _ in range(3))
    same = "identical ids" if enc.encode_ordinary(text) == ids else "IDS DIFFER"
    print(f"{line}, tiktoken {mb / tbest:.1f} MB/s -> ratio tinylm/tiktoken = {tbest / best:.2f}x speed ({same})")
    TABLE.append(f"| encode {name}, vocab {tok.vocab_size} | tinylm {mb / best:.1f} MB/s | tiktoken {mb / tbest:.1f} MB/s "
                 f"| {tbest / best:.2f}x | {same} |")


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def bench_first_run(tmp):
    """A fresh process: import + train a tiny tokenizer + encode, with the Numba cache on disk
    (every later run) and with an empty cache (the very first run: everything compiles)."""
    code = ("import time; t=time.perf_counter(); from tinylm.tokenizer import BPETokenizer; "
            "tok=BPETokenizer().train('hello world '*50, 300, progress=False); t1=time.perf_counter(); "
            "tok.encode('hello'); t2=time.perf_counter(); print(t1-t, t2-t1)")
    print()
    for label, env in (("Numba cache on disk", dict(os.environ)),
                       ("empty Numba cache: first run ever", dict(os.environ, NUMBA_CACHE_DIR=os.path.join(tmp, "nbcache")))):
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT, env=env)
        a, b = map(float, out.stdout.split())
        print(f"fresh process, import + tiny train + encode ({label}): {a + b:.1f} s (train {a:.1f}, encode {b:.1f})")


def bench_rss(docs, tmp, vocab):
    base = os.path.join(tmp, "corpus1.txt")
    with open(base, "w", encoding="utf-8") as f:
        f.write("".join(docs))
    big = os.path.join(tmp, "corpus4.txt")
    with open(big, "w", encoding="utf-8") as f:
        for k in range(4):  # four variants, so the distinct pre-tokens grow a little too
            f.write("".join(docs).replace("self", f"self{k}" if k else "self"))
    print()
    for path in (base, big):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, path, str(vocab), os.path.join(tmp, "t.json")],
                             check=True, capture_output=True, text=True, cwd=ROOT)
        secs, rss = map(float, out.stdout.split())
        print(f"stream-train {os.path.getsize(path) / 1e6:.0f} MB file from disk, vocab {vocab}: "
              f"{secs:.1f} s, peak RSS {rss:.0f} MiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller corpora (for a smoke run)")
    ap.add_argument("--data", default="", help="the tinyshakespeare text file (default: "
                    "$TINYLM_BENCH_DATA/tinyshakespeare.txt, else a generated stand-in)")
    args = ap.parse_args()
    if args.data and not os.path.isfile(args.data):
        ap.error(f"--data {args.data}: no such file")
    stdlib_mb = 2_000_000 if args.quick else 12_000_000
    with tempfile.TemporaryDirectory() as tmp:
        shak = shakespeare(args.quick, args.data)
        tok = bench_train("tinyshakespeare", shak, 4096, tmp)
        bench_encode("tinyshakespeare", shak, tok)
        lib = stdlib_docs(stdlib_mb)
        tok32 = bench_train("stdlib source", lib, 32768, tmp)
        bench_encode("stdlib source", lib, tok32)
        bench_encode("stdlib source", lib, train_tinylm(lib, 4096))
        bench_first_run(tmp)
        bench_rss(lib, tmp, 32768)
    print("\n| what | tinylm | reference | ratio (time: lower is better; speed: higher) | check |")
    print("|---|---|---|---|---|")
    print("\n".join(TABLE))


def train_tinylm(docs, vocab):
    from tinylm.tokenizer import BPETokenizer

    return BPETokenizer().train(docs, vocab, special_tokens=(), progress=False)


if __name__ == "__main__":
    main()
