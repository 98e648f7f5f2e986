"""Benchmark: every kernel op x backend at GPT shapes, forward + backward, in one process.

    python benchmarks/kernels.py [--threads 2] [--repeats 15] [--skip-memory] [--skip-jit]
                                 [--skip-user-loop] [--only speed|memory|jit|user_loop]

Shapes: B=8, T=256, C=384, NH=6 (hs=64), V=8192; AdamW and the gradient norm over 13.9M
parameters (the M-sized GPT). Backends: the NumPy reference ("ref"), every Numba CPU variant,
the GPU variants when CuPy and a GPU are present, and PyTorch CPU eager when importable. All are
measured in this run, with this many threads for Numba, BLAS and PyTorch alike; after two
warm-up calls each (JIT compile excluded), --repeats rounds call every backend of an op once in
turn. The ratios use the minimum (the least-disturbed call: on the shared 2-core machines
other jobs moved medians by 2-10x during development); the median is printed beside it. Values are
realistic (unit-scale activations, 0.02-scale weights, no zeros or subnormals: docs/performance.md,
"Pitfalls: denormals").

Columns: ms; GB/s (napkin bytes: each array read or written once, fwd + bwd) or GFLOP/s
(attention: 6 causal matmuls of 2*hs*T(T+1)/2 per head, i.e. fwd 2 + bwd 4; matmul: 2MKN);
"vs torch" = our ms / PyTorch's ms (target <= 1.0); "x ref" = NumPy ref ms / ours (target >= 3).
A row that misses a target says so.

Then: peak extra memory of attention fwd+bwd at T=2048 (B=1, NH=6, hs=64) for ref, plain, gemm and
flash, each in its own subprocess (peak RSS minus the RSS before the call, with the peak reset
through /proc/self/clear_refs and inputs and JIT already loaded: Numba allocates outside
tracemalloc's view, RSS sees everything); the cold JIT
compile time of all CPU kernels (a subprocess with an empty NUMBA_CACHE_DIR); and the warm start
(a second subprocess on that cache: import tinylm + one training-shaped forward/backward).

Then the user loop: an op timed through ``tinylm.functional`` the way a new user writes it, each
iteration building a fresh leaf input with requires_grad=True (``tinylm.tensor``, which wraps
the array without a copy), running the op and ``.sum().backward()``: F.gelu at (8, 256, 1536),
F.cross_entropy at N=2048, V=8192 with integer targets, F.layer_norm at (8, 256, 384) (w and b
built once, as parameters). PyTorch runs the same loop (a fresh ``torch.tensor(...,
requires_grad=True)``, which copies, each iteration) in a process of its own, and tinylm in
another without torch; the two alternate for --user-rounds rounds. Beside it: tinylm's
kernel-only time (the op's fwd + bwd kernels on arrays). The ratio tinylm/PyTorch uses the
minimum per iteration, as the table above does (target <= 1.0); the ratio of the medians is
printed beside it (a pause of the cyclic GC would show there). Then the memory
each side holds after --user-mem-iters more iterations with gc disabled (RSS growth: it should
not grow), and whether tinylm's input leaf was freed by reference counting alone.

Note (measured here): PyTorch must be imported before Numba starts its OpenMP thread pool.
Numba's "omp" layer loads the system libgomp.so.1; a torch imported afterwards binds to that
already-loaded soname instead of its bundled libgomp, and its SDPA fwd+bwd went from 24 ms to
1.3-1.9 s (four runs of each order). Imported first, torch keeps its own runtime.

Leaves out: bf16/fp16, GPU memory, multi-process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

B, T, C, NH, V = 8, 256, 384, 6, 8192
HS = C // NH
N_PARAMS = 13_900_000


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines()
                    if line.startswith("model name"))
        return f"{name}, {os.cpu_count()} logical CPUs, AVX-512: {'avx512f' in info}"
    except (OSError, StopIteration):
        return "unknown CPU"


_FLUSH = {}


def flush_caches():
    """Stream 96 MiB through the caches (3x this machine's 32 MiB L3), so every timed call starts
    cold. Without it the backend timed right after the NumPy ref (whose temporaries evict
    everything) was 3x slower than the one after it: round-robin order decided the ratio."""
    import numpy as np
    buf = _FLUSH.setdefault("buf", np.ones(24 * 2**20, dtype=np.float32))
    buf += 1.0


def time_round_robin(fns: dict, repeats: int, syncs: dict) -> dict:
    """name -> (min ms, median ms). Two warm-up calls each (JIT excluded), then `repeats`
    rounds that call every backend once in turn, so a burst of load from other processes hits
    all of them alike rather than whichever happened to be running; caches are flushed and the
    thread pools left to go idle before every timed call."""
    for name, fn in fns.items():
        for _ in range(2):
            fn()
        if syncs.get(name):
            syncs[name]()
    ts = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync = syncs.get(name)
            flush_caches()
            # let every pool go idle before the next backend starts: OpenBLAS workers spin for
            # up to 2^28 cycles (~0.1 s) after a call (OPENBLAS_THREAD_TIMEOUT), GOMP workers
            # spin after a parallel region, and a spinning pool steals a core from whichever
            # backend runs next (torch's SDPA measured 492 ms in a run without this pause,
            # 60-190 ms on its own at the same load)
            time.sleep(0.12)
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            ts[name].append(1e3 * (time.perf_counter() - t0))
    return {name: (min(v), sorted(v)[len(v) // 2]) for name, v in ts.items()}


def make_inputs(np):
    rng = np.random.default_rng(0)
    f32 = np.float32
    N = B * T
    d = {
        "x": rng.standard_normal((N, C)).astype(f32),
        "w": (1 + 0.02 * rng.standard_normal(C)).astype(f32),
        "b": (0.02 * rng.standard_normal(C)).astype(f32),
        "dx": rng.standard_normal((N, C)).astype(f32),
        "h": rng.standard_normal((B, T, 4 * C)).astype(f32),
        "dh": rng.standard_normal((B, T, 4 * C)).astype(f32),
        "logits": (2 * rng.standard_normal((N, V))).astype(f32),
        "targets": rng.integers(0, V, N),
        "q": rng.standard_normal((B, NH, T, HS)).astype(f32),
        "k": rng.standard_normal((B, NH, T, HS)).astype(f32),
        "v": rng.standard_normal((B, NH, T, HS)).astype(f32),
        "do": rng.standard_normal((B, NH, T, HS)).astype(f32),
        "ids": rng.integers(0, V, (B, T)),
        "wte": (0.02 * rng.standard_normal((V, C))).astype(f32),
        "demb": rng.standard_normal((B, T, C)).astype(f32),
        "p": (0.02 * rng.standard_normal(N_PARAMS)).astype(f32),
        "g": (1e-3 * rng.standard_normal(N_PARAMS)).astype(f32),
        "m": (1e-4 * rng.standard_normal(N_PARAMS)).astype(f32),
        "vv": (1e-7 * (1 + rng.random(N_PARAMS))).astype(f32),
        "ma": rng.standard_normal((N, C)).astype(f32),
        "mb": rng.standard_normal((C, 4 * C)).astype(f32),
    }
    d["targets"][::10] = -100  # SFT-like masked rows
    return d


def our_cases(mods, d, xp):
    """op -> {variant: zero-arg callable doing fwd + bwd} for one array module."""
    A = {k: (xp.asarray(v) if hasattr(v, "shape") else v) for k, v in d.items()}
    L, G, X, AT, E, AD, GN, MM = mods
    dl = xp.full(B * T, 1.0, dtype=xp.float32)
    cases = {}

    def pair(fwd, bwd):
        return lambda: bwd(fwd())

    for name, (f, bw) in {k: (L.VARIANTS["layernorm_fwd"][k], L.VARIANTS["layernorm_bwd"][k])
                          for k in L.VARIANTS["layernorm_fwd"]}.items():
        cases.setdefault("layernorm", {})[name] = pair(
            lambda f=f: f(A["x"], A["w"], A["b"], 1e-5),
            lambda r, bw=bw: bw(A["dx"], A["x"], A["w"], r[1], r[2]))
    for name in G.VARIANTS["gelu_fwd"]:
        f, bw = G.VARIANTS["gelu_fwd"][name], G.VARIANTS["gelu_bwd"][name]
        cases.setdefault("gelu", {})[name] = pair(lambda f=f: f(A["h"]),
                                                  lambda r, bw=bw: bw(A["dh"], A["h"]))
    for name in X.VARIANTS["cross_entropy_fwd"]:
        f, bw = X.VARIANTS["cross_entropy_fwd"][name], X.VARIANTS["cross_entropy_bwd"][name]
        cases.setdefault("cross_entropy", {})[name] = pair(
            lambda f=f: f(A["logits"], A["targets"], -100),
            lambda r, bw=bw: bw(A["logits"], A["targets"], r[1], dl, -100))
    for name in AT.VARIANTS["attention_fwd"]:
        f, bw = AT.VARIANTS["attention_fwd"][name], AT.VARIANTS["attention_bwd"][name]
        cases.setdefault("attention", {})[name] = pair(
            lambda f=f: f(A["q"], A["k"], A["v"]),
            lambda r, bw=bw: bw(A["do"], A["q"], A["k"], A["v"], r[0], r[1]))
    for name in E.VARIANTS["embedding_fwd"]:
        f, bw = E.VARIANTS["embedding_fwd"][name], E.VARIANTS["embedding_bwd"][name]
        cases.setdefault("embedding", {})[name] = pair(lambda f=f: f(A["ids"], A["wte"]),
                                                       lambda r, bw=bw: bw(A["demb"], A["ids"], V))
    for name, f in AD.VARIANTS["adamw_update"].items():
        cases.setdefault("adamw", {})[name] = (
            lambda f=f: f(A["p"], A["g"], A["m"], A["vv"], 3e-4, 0.9, 0.95, 1e-8, 0.1, 10))
    for name, f in GN.VARIANTS["sumsq"].items():
        cases.setdefault("grad_norm", {})[name] = lambda f=f: math.sqrt(f(A["g"]))
    for name, f in MM.VARIANTS["matmul"].items():
        cases.setdefault("matmul", {})[name] = lambda f=f: f(A["ma"], A["mb"])
    return cases


def torch_cases(d, threads):
    try:
        import torch
    except Exception:
        return None, None
    torch.set_num_threads(threads)
    F = torch.nn.functional
    t = {k: torch.from_numpy(v) for k, v in d.items() if k not in ("p", "g", "m", "vv")}

    def ln():
        x = t["x"].clone().requires_grad_()
        w, b = t["w"].clone().requires_grad_(), t["b"].clone().requires_grad_()
        F.layer_norm(x, (C,), w, b, 1e-5).backward(t["dx"])

    def gelu():
        h = t["h"].clone().requires_grad_()
        F.gelu(h, approximate="tanh").backward(t["dh"])

    def ce():
        z = t["logits"].clone().requires_grad_()
        F.cross_entropy(z, t["targets"], ignore_index=-100, reduction="sum").backward()

    def attn():
        q, k, v = (t[n].clone().requires_grad_() for n in "qkv")
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(t["do"])

    def emb():
        w = t["wte"].clone().requires_grad_()
        F.embedding(t["ids"], w).backward(t["demb"])

    p = torch.nn.Parameter(torch.from_numpy(d["p"].copy()))
    p.grad = torch.from_numpy(d["g"].copy())
    try:
        opt = torch.optim.AdamW([p], lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        opt.step()
        kind = "fused"
    except Exception:
        opt = torch.optim.AdamW([p], lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
        kind = "foreach"
    g = p.grad

    cases = {"layernorm": ln, "gelu": gelu, "cross_entropy": ce, "attention": attn,
             "embedding": emb, "adamw": opt.step,
             "grad_norm": lambda: float(torch.linalg.vector_norm(g)),
             "matmul": lambda: torch.matmul(t["ma"], t["mb"])}
    return cases, f"torch {torch.__version__} (AdamW {kind})"


def work(op):
    """(amount, unit) of one fwd+bwd call, for the throughput column."""
    N = B * T
    gb = {"layernorm": 5 * N * C * 4, "gelu": 5 * B * T * 4 * C * 4, "cross_entropy": 3 * N * V * 4,
          "embedding": (3 * N * C + V * C) * 4, "adamw": 7 * N_PARAMS * 4,
          "grad_norm": N_PARAMS * 4}
    if op in gb:
        return gb[op] / 1e9, "GB/s"
    if op == "attention":
        return 6 * 2 * HS * T * (T + 1) / 2 * B * NH / 1e9, "GFLOP/s"
    return 2 * N * C * 4 * C / 1e9, "GFLOP/s"  # matmul (B*T, C) @ (C, 4C)


def speed_table(args):
    import numpy as np

    try:  # before Numba starts its OpenMP pool: see the note at the top of this file
        import torch
        torch.set_num_threads(args.threads)
    except Exception:
        pass

    from kernels import adamw, cross_entropy, embedding, gelu, gradnorm, layernorm
    from kernels._common import gpu_unavailable_reason
    from kernels.lab import attention, matmul  # the whole tables: the lab's variants included
    from kernels import _threads

    n = _threads.set_num_threads(args.threads)
    mods = (layernorm, gelu, cross_entropy, attention, embedding, adamw, gradnorm, matmul)
    d = make_inputs(np)
    ours = our_cases(mods, d, np)
    gpu_why = gpu_unavailable_reason()
    gpu = None
    if gpu_why is None and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        import cupy
        gpu = (our_cases(mods, d, cupy), cupy.cuda.Device().synchronize)
    tc, tver = torch_cases(d, args.threads)
    print(f"machine: {cpu_model()}; load average before the run: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (other processes share these cores)")
    print(f"threads: Numba {n} (tinylm's BLAS calls run inside them; OpenBLAS's own pool: "
          f"{_threads.blas_num_threads()}), torch {args.threads}; "
          f"{tver or 'PyTorch not importable'}; GPU: {gpu_why or 'present'}")
    print(f"shapes: B={B} T={T} C={C} NH={NH} hs={HS} V={V}; AdamW/grad-norm over {N_PARAMS:,} "
          f"params; fwd+bwd; {args.repeats} round-robin rounds; ratios use the min\n")
    hdr = (f"{'op':14s} {'backend':10s} {'min ms':>9s} {'median':>9s} {'thru':>8s} {'unit':8s} "
           f"{'vs torch':>9s} {'x ref':>7s}  note")
    print(hdr)
    print("-" * len(hdr))
    results = {}
    for op, table in ours.items():
        if args.ops and op not in args.ops.split(","):
            continue
        amount, unit = work(op)
        fns = {name: fn for name, fn in table.items() if not name.startswith("gpu")}
        syncs = {}
        if gpu:
            for name, fn in gpu[0][op].items():
                if name.startswith("gpu"):
                    fns[name], syncs[name] = fn, gpu[1]
        if tc:
            fns["torch"] = tc[op]
        rows = time_round_robin(fns, args.repeats, syncs)
        t_ms = rows["torch"][0] if tc else None
        ref_ms = rows["ref"][0]
        for name, (ms, med) in rows.items():
            vs_t = ms / t_ms if t_ms else float("nan")
            x_ref = ref_ms / ms
            note = ""
            if not name.startswith(("ref", "gpu", "torch")):
                # matmul's reference is BLAS itself: its "cpu" (the same BLAS, threaded by
                # Numba) has only the torch target, and cpu_numba is the hand-written study kernel
                miss = []
                if t_ms and vs_t > 1.0:
                    miss.append("slower than torch")
                if x_ref < 3.0 and op != "matmul":
                    miss.append("< 3x ref")
                note = ("MISSED: " + ", ".join(miss)) if miss else "targets met"
                if op == "matmul" and name == "cpu_numba":
                    note += " (study kernel, not the default)"
            print(f"{op:14s} {name:10s} {ms:9.3f} {med:9.3f} {amount / (ms / 1e3):8.1f} {unit:8s} "
                  f"{vs_t:9.2f} {x_ref:7.2f}  {note}")
        results[op] = {name: {"min_ms": ms, "median_ms": med} for name, (ms, med) in rows.items()}
    return results


# ---- memory: attention at T=2048, one subprocess per variant ----------------------------------

MEM_CHILD = r"""
import sys, numpy as np
sys.path.insert(0, {root!r})
from kernels.lab import attention as A  # every variant, the lab's included
from kernels import _threads
_threads.set_num_threads({threads})
name = {name!r}
fwd, bwd = A.VARIANTS["attention_fwd"][name], A.VARIANTS["attention_bwd"][name]
small = [np.ones((1, 1, 4, 64), np.float32)] * 4
o = fwd(*small[:3]); bwd(small[3], *small[:3], *o)  # load the JIT before measuring
rng = np.random.default_rng(0)
q, k, v, d = (rng.standard_normal((1, 6, 2048, 64)).astype(np.float32) for _ in range(4))
def status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
base = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
out, lse = fwd(q, k, v)
grads = bwd(d, q, k, v, out, lse)
print((status_kib("VmHWM") - base) * 1024)
"""


def memory_table(args):
    print("\nattention fwd+bwd at B=1, NH=6, T=2048, hs=64: peak extra memory (RSS) per variant")
    out = {}
    for name in ("ref", "cpu_plain", "cpu_flash", "cpu_gemm"):
        code = MEM_CHILD.format(root=str(ROOT), threads=args.threads, name=name)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            print(f"  {name:10s} failed: {r.stderr.strip()[-300:]}")
            continue
        out[name] = int(r.stdout.strip().splitlines()[-1])
        print(f"  {name:10s} {out[name] / 2**20:9.1f} MiB")
    if "cpu_flash" in out and "cpu_plain" in out:
        print(f"  flash / plain = {out['cpu_flash'] / max(out['cpu_plain'], 1):.3f} "
              f"(outputs and gradients themselves: 4 x 3 MiB)")
    return out


# ---- JIT: cold compile and warm start --------------------------------------------------------

KERNELS_CHILD = r"""
import time, sys
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import numpy as np
rng = np.random.default_rng(0)
f = lambda *s: rng.standard_normal(s).astype(np.float32)
from kernels import layernorm as L, gelu as G, cross_entropy as X, embedding as E
from kernels import adamw as AD, gradnorm as GN
from kernels.lab import attention as A, matmul as M
x = f(4, 8); o = L.layernorm_fwd_cpu(x, f(8), f(8), 1e-5); L.layernorm_bwd_cpu(x, x, f(8), o[1], o[2])
G.gelu_bwd_cpu(x, G.gelu_fwd_cpu(x))
t = np.array([1, 2, -100, 0]); o = X.cross_entropy_fwd_cpu(x, t, -100); X.cross_entropy_bwd_cpu(x, t, o[1], f(4), -100)
q = f(1, 2, 5, 4)
for n in ("cpu_plain", "cpu_flash"):
    o = A.VARIANTS["attention_fwd"][n](q, q, q); A.VARIANTS["attention_bwd"][n](q, q, q, q, *o)
ids = np.array([[1, 2], [2, 0]]); E.embedding_bwd_cpu(E.embedding_fwd_cpu(ids, f(3, 8)), ids, 3)
AD.adamw_update_cpu(f(9), f(9), f(9), np.abs(f(9)), 1e-3, 0.9, 0.95, 1e-8, 0.1, 1)
GN.sumsq_cpu(f(9)); M.matmul_cpu_numba(f(3, 4), f(4, 5))
print(repr(time.perf_counter() - t0))
"""

MODEL_CHILD = r"""
import time, sys
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import numpy as np
import tinylm
from tinylm.models import GPT, GPTConfig
m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=512))
idx = np.random.default_rng(0).integers(0, 512, (4, 64))
logits, loss = m(idx, idx)
loss.backward()
print(repr(time.perf_counter() - t0))
"""


def _child(code, env):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=900)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return None, wall, r.stderr.strip()[-400:]
    return float(r.stdout.strip().splitlines()[-1]), wall, None


def jit_table(args):
    print("\nJIT: cold = every CPU kernel compiled once (float32) into an empty NUMBA_CACHE_DIR; "
          "warm start = a fresh process on the filled cache: import tinylm + one training-shaped "
          "fwd/bwd (GPT 2 layers x 64 wide, B=4, T=64)")
    res = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, TINYLM_NUM_THREADS=str(args.threads))
        inside, wall, err = _child(KERNELS_CHILD.format(root=str(ROOT)), env)
        if err:
            print(f"  cold compile failed: {err}")
        else:
            print(f"  cold compile of all CPU kernels: {inside:.2f} s ({wall:.2f} s whole process)")
            res["cold_s"] = inside
        model = MODEL_CHILD.format(root=str(ROOT))
        _child(model, env)  # compiles whatever else the model path needs (other signatures)
        inside, wall, err = _child(model, env)
        if err:
            print(f"  warm start failed (tinylm model path): {err}")
        else:
            ok = wall < 3.0
            print(f"  warm start: {wall:.2f} s whole process ({inside:.2f} s after interpreter "
                  f"start); target < 3 s: {'met' if ok else 'MISSED'}")
            res["warm_process_s"] = wall
    return res


# ---- the user loop: fresh leaves through tinylm.functional vs PyTorch, each in its own process

USER_LOOP_COMMON = r"""
import gc, json, sys, time, weakref
import numpy as np
threads, iters, mem_iters = {threads}, {iters}, {mem_iters}
rng = np.random.default_rng(0)
H = rng.standard_normal((8, 256, 1536)).astype(np.float32)        # gelu input
Z = (2 * rng.standard_normal((2048, 8192))).astype(np.float32)    # logits, N=2048, V=8192
TG = rng.integers(0, 8192, 2048)                                  # int64 targets
XL = rng.standard_normal((8, 256, 384)).astype(np.float32)       # layer_norm input
WL = (1 + 0.02 * rng.standard_normal(384)).astype(np.float32)
BL = (0.02 * rng.standard_normal(384)).astype(np.float32)

def rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None

def timed(fn, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - t0))
    return out

def held_after(fn):
    # RSS growth over mem_iters iterations with the cyclic GC off (after warm-up iterations)
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            fn()
        r0 = rss_mib()
        for _ in range(mem_iters):
            fn()
        r1 = rss_mib()
        leaf = weakref.ref(fn())  # the returned leaf's last strong reference dies here
        freed = leaf() is None
    finally:
        gc.enable()
        gc.collect()
    return (None if r0 is None or r1 is None else r1 - r0), freed
"""

USER_LOOP_TINYLM = USER_LOOP_COMMON + r"""
sys.path.insert(0, {root!r})
import tinylm
from tinylm import functional as F
import kernels
from kernels import _threads
_threads.set_num_threads(threads)
w, b = tinylm.tensor(WL, requires_grad=True), tinylm.tensor(BL, requires_grad=True)

def gelu_loop():
    x = tinylm.tensor(H, requires_grad=True)
    F.gelu(x).sum().backward()
    return x

def ce_loop():
    z = tinylm.tensor(Z, requires_grad=True)
    F.cross_entropy(z, TG).sum().backward()
    return z

def ln_loop():
    x = tinylm.tensor(XL, requires_grad=True)
    F.layer_norm(x, w, b).sum().backward()
    return x

ones_h = np.ones_like(H)
gf, gb = kernels.get("gelu_fwd", H), kernels.get("gelu_bwd", H)
cf, cb = kernels.get("cross_entropy_fwd", Z), kernels.get("cross_entropy_bwd", Z)
dl = np.full(2048, 1 / 2048, dtype=np.float32)  # the mean's gradient per row
X2 = XL.reshape(-1, 384)
ones_x = np.ones_like(X2)
lf, lb = kernels.get("layernorm_fwd", X2), kernels.get("layernorm_bwd", X2)

def gelu_kernels():
    gf(H); gb(ones_h, H)

def ce_kernels():
    loss, lse = cf(Z, TG, -100); cb(Z, TG, lse, dl, -100)

def ln_kernels():
    out, mean, rstd = lf(X2, WL, BL, 1e-5); lb(ones_x, X2, WL, mean, rstd)

res = {{}}
for name, loop, kern in (("gelu", gelu_loop, gelu_kernels), ("cross_entropy", ce_loop, ce_kernels),
                         ("layer_norm", ln_loop, ln_kernels)):
    for _ in range(3):  # warm-up: JIT cache, allocator
        loop(); kern()
    ms = timed(loop, iters)
    km = timed(kern, iters)
    grow, freed = held_after(loop)
    res[name] = {{"loop_ms": ms, "kernel_ms": km, "rss_growth_mib": grow, "leaf_freed": freed}}
print(json.dumps(res))
"""

USER_LOOP_TORCH = USER_LOOP_COMMON + r"""
import torch
torch.set_num_threads(threads)
F = torch.nn.functional
tg = torch.from_numpy(TG)
w, b = torch.tensor(WL, requires_grad=True), torch.tensor(BL, requires_grad=True)

def gelu_loop():
    x = torch.tensor(H, requires_grad=True)
    F.gelu(x, approximate="tanh").sum().backward()
    return x

def ce_loop():
    z = torch.tensor(Z, requires_grad=True)
    F.cross_entropy(z, tg).sum().backward()
    return z

def ln_loop():
    x = torch.tensor(XL, requires_grad=True)
    F.layer_norm(x, (384,), w, b, 1e-5).sum().backward()
    return x

res = {{"version": torch.__version__}}
for name, loop in (("gelu", gelu_loop), ("cross_entropy", ce_loop), ("layer_norm", ln_loop)):
    for _ in range(3):
        loop()
    ms = timed(loop, iters)
    grow, freed = held_after(loop)
    res[name] = {{"loop_ms": ms, "rss_growth_mib": grow, "leaf_freed": freed}}
print(json.dumps(res))
"""

USER_LOOP_SHAPES = {"gelu": "(8,256,1536)", "cross_entropy": "N=2048 V=8192", "layer_norm": "(8,256,384)"}


def _json_child(code, env):
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        return None, r.stderr.strip()[-600:]
    return json.loads(r.stdout.strip().splitlines()[-1]), None


def user_loop_table(args):
    rounds, iters, mem_iters = args.user_rounds, args.user_iters, args.user_mem_iters
    fmt = dict(root=str(ROOT), threads=args.threads, iters=iters, mem_iters=mem_iters)
    env = dict(os.environ, TINYLM_NUM_THREADS=str(args.threads))
    ours, theirs, tver, err_t = [], [], None, None
    for _ in range(rounds):  # alternate the two processes: a burst of load hits both alike
        r, err = _json_child(USER_LOOP_TINYLM.format(**fmt), env)
        if err:
            print(f"\nuser loop: the tinylm process failed: {err}")
            return {}
        ours.append(r)
        r, err_t = _json_child(USER_LOOP_TORCH.format(**fmt), env)
        if r is not None:
            tver = r.pop("version")
            theirs.append(r)
    print(f"\nuser loop: per iteration a fresh leaf (requires_grad=True) -> op -> .sum().backward(), "
          f"gc on; tinylm and {'torch ' + tver if tver else 'PyTorch (not importable)'} each in "
          f"its own process, {rounds} alternating rounds of {iters} iterations; ms per iteration, "
          f"median (min) over all rounds; ratio = tinylm loop / torch loop, of the mins (of the "
          f"medians), target <= 1.0 on the mins")
    if err_t and not theirs:
        print(f"  (the PyTorch process failed: {err_t.splitlines()[-1] if err_t else ''})")
    hdr = (f"{'case':28s} {'tinylm loop':>16s} {'kernels only':>16s} {'torch loop':>16s} "
           f"{'tinylm/torch':>14s}  target")
    print(hdr)
    print("-" * len(hdr))

    def med_min(v):
        v = sorted(v)
        return v[len(v) // 2], v[0]

    out = {}
    for case, shape in USER_LOOP_SHAPES.items():
        lm = med_min([t for r in ours for t in r[case]["loop_ms"]])
        km = med_min([t for r in ours for t in r[case]["kernel_ms"]])
        tm = med_min([t for r in theirs for t in r[case]["loop_ms"]]) if theirs else None
        ratio = lm[1] / tm[1] if tm else float("nan")
        ratio_med = lm[0] / tm[0] if tm else float("nan")
        verdict = ("met" if ratio <= 1.0 else "MISSED") if tm else "-"
        tcol = f"{tm[0]:7.2f} ({tm[1]:6.2f})" if tm else f"{'-':>16s}"
        print(f"{case + ' ' + shape:28s} {lm[0]:7.2f} ({lm[1]:6.2f}) {km[0]:7.2f} ({km[1]:6.2f}) "
              f"{tcol} {ratio:6.2f} ({ratio_med:5.2f})  {verdict}")
        out[case] = {"tinylm_loop_ms": lm, "kernel_ms": km, "torch_loop_ms": tm, "ratio_min": ratio,
                     "ratio_median": ratio_med}
    print(f"memory held after {mem_iters} more iterations with gc disabled (RSS growth, last round; "
          f"should not grow):")
    for case in USER_LOOP_SHAPES:
        o = ours[-1][case]
        line = (f"  {case:14s} tinylm {o['rss_growth_mib']:+8.1f} MiB (input leaf freed by "
                f"reference counting: {'yes' if o['leaf_freed'] else 'NO'})")
        if theirs:
            line += f"; torch {theirs[-1][case]['rss_growth_mib']:+8.1f} MiB"
        print(line)
        out[case]["tinylm_rss_growth_mib"] = o["rss_growth_mib"]
        out[case]["tinylm_leaf_freed"] = o["leaf_freed"]
        if theirs:
            out[case]["torch_rss_growth_mib"] = theirs[-1][case]["rss_growth_mib"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--ops", help="comma-separated subset, e.g. attention,grad_norm")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-jit", action="store_true")
    ap.add_argument("--skip-user-loop", action="store_true")
    ap.add_argument("--only", choices=("speed", "memory", "jit", "user_loop"),
                    help="run this section alone")
    ap.add_argument("--user-rounds", type=int, default=2, help="user loop: alternating rounds")
    ap.add_argument("--user-iters", type=int, default=15, help="user loop: timed iterations a round")
    ap.add_argument("--user-mem-iters", type=int, default=30,
                    help="user loop: iterations with gc disabled for the memory column")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    args = ap.parse_args()

    def want(section, skipped=False):
        return args.only == section if args.only else not skipped

    out = {}
    if want("speed"):
        out["speed"] = speed_table(args)
    if want("memory", args.skip_memory):
        out["memory_bytes"] = memory_table(args)
    if want("jit", args.skip_jit):
        out["jit"] = jit_table(args)
    if want("user_loop", args.skip_user_loop):
        out["user_loop"] = user_loop_table(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
