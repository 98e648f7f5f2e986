"""Check the GPU kernels without a GPU: run them under Numba's CUDA simulator, or compile to PTX.

    NUMBA_ENABLE_CUDASIM=1 python -m kernels._gpucheck sim   # every GPU variant vs its _ref
    NUMBA_ENABLE_CUDASIM=1 python -m kernels._gpucheck sim16 # bf16/fp16 inputs vs the fp32 _ref
    python -m kernels._gpucheck ptx                          # every kernel -> PTX, sm_80 + sm_90

One line per check: ``OK <what>`` or ``FAIL <what>: <why>``; exit status 1 if any failed. The two
modes need different processes: the simulator must be switched on before numba.cuda is first
imported, and compile_ptx needs the real numba.cuda (NVVM from the nvidia-* wheels).
Simulator shapes are tiny (every simulated thread is a Python thread) but span several blocks.

Leaves out: timing (the simulator's speed means nothing), streams, multi-GPU.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback

import numpy as np

from kernels.lab import gpu_kernels_for_ptx, variants

FAMILIES = ("layernorm", "gelu", "cross_entropy", "attention", "embedding", "adamw", "gradnorm",
            "matmul", "rmsnorm", "rope", "swiglu", "head_ce")


def _cases(dt, rng):
    """op -> (args, in-place arg indices) with several blocks per launch, for dtype dt."""
    def f(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dt)
    x = f(3, 200)
    _, mean, rstd = importlib.import_module("kernels.layernorm").layernorm_fwd_ref(
        x, f(200), f(200), 1e-5)
    z = f(3, 300, scale=3.0)
    z[1, 7] = 1000.0  # extreme logits stay finite
    z[2, :] -= 1000.0
    tg = np.array([5, 7, -100])
    lse = importlib.import_module("kernels.cross_entropy").cross_entropy_fwd_ref(z, tg, -100)[1]
    # grouped-query: 4 query heads over 2 kv heads; 280 query rows: 3 blocks of 128, 140 key rows
    q, d = f(1, 4, 70, 4), f(1, 4, 70, 4)
    k, v = f(1, 2, 70, 4), f(1, 2, 70, 4)
    o, l = importlib.import_module("kernels.attention").attention_fwd_ref(q, k, v)
    ids = np.array([[1, 3, 3, 0, 10], [3, 1, 1, 1, 9], [0, 0, 2, 3, 3]])  # duplicates, V=11
    rstd = importlib.import_module("kernels.rmsnorm").rmsnorm_fwd_ref(x, f(200), 1e-6)[1]
    cos, sin = importlib.import_module("kernels.rope").rope_tables(10, np.arange(3, 8), dtype=dt)
    sw = f(2, 300, scale=3.0)
    sw[0, :4] = (-30.0, 30.0, -100.0, 100.0)  # saturated gates
    return {
        "layernorm_fwd": ((x, f(200), f(200), 1e-5), ()),
        "layernorm_bwd": ((f(3, 200), x, f(200), mean, rstd), ()),
        "gelu_fwd": ((f(2, 300, scale=3.0),), ()),  # 600 elements: 3 blocks of 256
        "gelu_bwd": ((f(2, 300), f(2, 300, scale=3.0)), ()),
        "cross_entropy_fwd": ((z, tg, -100), ()),
        "cross_entropy_bwd": ((z, tg, lse, f(3), -100), ()),
        # 5 rows (one ignored), C=6, V=300 (the CPU kernel's vocabulary blocks: see head_ce.py);
        # a gradient scale per row (a sequence log-prob's backward; one number is the same path)
        # and dw of rows 100.. only (a grown vocabulary's head)
        "head_ce": ((f(5, 6), f(300, 6), np.array([5, 299, -100, 0, 17]), -100, f(5), True, True, 100), ()),
        "attention_fwd": ((q, k, v), ()),
        "attention_bwd": ((d, q, k, v, o, l), ()),
        "embedding_fwd": ((ids, f(11, 40)), ()),  # 600 outputs: 3 blocks
        "embedding_bwd": ((f(3, 5, 40), ids, 11), ()),  # 440 outputs: 2 blocks
        "adamw_update": ((f(600), f(600), f(600, scale=0.1), np.abs(f(600, scale=0.01)),
                          1e-2, 0.9, 0.95, 1e-8, 0.1, 3), (0, 2, 3)),
        "sumsq": ((f(600),), ()),
        "matmul": ((f(20, 17), f(17, 35)), ()),  # 3 x 2 blocks of 16 x 16
        "matmul_acc": ((f(20, 17), f(17, 35), f(20, 35)), (2,)),
        "rmsnorm_fwd": ((x, f(200), 1e-6), ()),  # C=200 > 128 threads: the strided row loop
        "rmsnorm_bwd": ((f(3, 200), x, f(200), rstd), ()),
        # 2*5*6 heads x 5 pairs = 300 threads: 2 blocks; odd T, odd pair count, positions 3..7
        "rope_fwd": ((f(2, 5, 6, 10), cos, sin, False), ()),
        "rope_bwd": ((f(2, 5, 6, 10), cos, sin, True), ()),
        "swiglu_fwd": ((sw, f(2, 300)), ()),  # 600 elements: 3 blocks of 256
        "swiglu_bwd": ((f(2, 300), sw, f(2, 300)), ()),
    }


def _run(fn, args, inplace):
    args = tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args)
    out = fn(*args)
    if inplace:
        return [args[i] for i in inplace]
    return [np.asarray(o) for o in (out if isinstance(out, tuple) else (out,))]


def check_sim() -> int:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        print("FAIL setup: NUMBA_ENABLE_CUDASIM=1 must be set before this process starts")
        return 1
    bad = 0
    for dt, tol in ((np.float32, 2e-5), (np.float64, 1e-12)):
        cases = _cases(dt, np.random.default_rng(0))
        for fam in FAMILIES:
            for op, table in variants(fam).items():  # the lab's variants included
                args, inplace = cases[op]
                want = _run(table["ref"], args, inplace)
                for name, fn in table.items():
                    if not name.startswith("gpu"):
                        continue
                    what = f"sim {op} {name} {np.dtype(dt).name}"
                    try:
                        got = _run(fn, args, inplace)
                        errs = [float(np.max(np.abs(g - w) / (1 + np.abs(w)), initial=0.0))
                                for g, w in zip(got, want)]
                        finite = all(np.all(np.isfinite(g)) for g in got)
                        ok = finite and max(errs) <= tol and all(
                            g.shape == w.shape and g.dtype == w.dtype for g, w in zip(got, want))
                        print(f"{'OK' if ok else 'FAIL'} {what}: max rel err {max(errs):.1e}")
                        bad += not ok
                    except Exception:
                        print(f"FAIL {what}: {traceback.format_exc(limit=3)!r}")
                        bad += 1
    return bad


# 16-bit checks (kernels/_lowp.py): each op with its float inputs stored in bf16 / fp16, against
# the fp32 reference on the same (decoded) inputs. Statistics a forward returns in fp32 (mean,
# rstd, lse, per-row losses) are passed to the backward in fp32, as the autograd ops do.
FP32_ARGS = {"layernorm_bwd": (3, 4), "rmsnorm_bwd": (3,), "cross_entropy_bwd": (2, 3), "attention_bwd": (5,),
             "rope_fwd": (1, 2), "rope_bwd": (1, 2)}


def check_16bit(backend: str, fams=FAMILIES):
    """[(op, fmt, max rel err, tolerance, ok)] for every op of ``fams`` on ``backend``."""
    from kernels import get
    from kernels._formats import from_f32, to_f32
    from kernels._lowp import INTEGER_ARGS, TOLERANCE

    rows = []
    for fmt in ("bf16", "fp16"):
        cases = _cases(np.float32, np.random.default_rng(0))
        for fam in fams:
            for op, table in importlib.import_module(f"kernels.{fam}").VARIANTS.items():
                args, inplace = cases[op]
                keep = set(FP32_ARGS.get(op, ())) | set(INTEGER_ARGS.get(op, ()))
                a16 = tuple(from_f32(a, fmt) if isinstance(a, np.ndarray) and a.dtype == np.float32
                            and i not in keep else a for i, a in enumerate(args))
                dec = tuple(to_f32(a) if i not in keep and isinstance(a, np.ndarray) else a
                            for i, a in enumerate(a16))
                want = _run(table["ref"], dec, inplace)
                got = _run(get(op, *a16, backend=backend), a16, inplace)
                err = max(float(np.max(np.abs(to_f32(g).astype(np.float64) - w) / (1 + np.abs(w)), initial=0.0))
                          for g, w in zip(got, want))
                finite = all(np.all(np.isfinite(to_f32(g))) for g in got)
                rows.append((op, fmt, err, TOLERANCE[fmt], finite and err <= TOLERANCE[fmt]))
    return rows


def check_sim16() -> int:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        print("FAIL setup: NUMBA_ENABLE_CUDASIM=1 must be set before this process starts")
        return 1
    bad = 0
    for op, fmt, err, tol, ok in check_16bit("gpu"):
        print(f"{'OK' if ok else 'FAIL'} sim16 {op} gpu {fmt}: max rel err {err:.1e} (tolerance {tol:.0e})")
        bad += not ok
    return bad


def check_ptx() -> int:
    from numba import cuda
    bad = 0
    for fam in FAMILIES:
        for name, pyfunc, sig in gpu_kernels_for_ptx(fam):  # the lab's kernels included
            for cc in ((8, 0), (9, 0)):
                what = f"ptx {name} sm_{cc[0]}{cc[1]}"
                try:
                    ptx, _ = cuda.compile_ptx(pyfunc, sig, cc=cc)
                    ok = f".target sm_{cc[0]}{cc[1]}" in ptx and ".entry" in ptx
                    print(f"{'OK' if ok else 'FAIL'} {what}: {len(ptx)} chars")
                    bad += not ok
                except Exception:
                    print(f"FAIL {what}: {traceback.format_exc(limit=3)!r}")
                    bad += 1
    return bad


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode not in ("sim", "sim16", "ptx"):
        sys.exit("usage: python -m kernels._gpucheck sim|sim16|ptx")
    sys.exit(1 if {"sim": check_sim, "sim16": check_sim16, "ptx": check_ptx}[mode]() else 0)
