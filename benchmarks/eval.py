"""Evaluation speed: the forward pass that scoring runs, and the HumanEval harness.

1. Forward throughput (tokens/s, no autograd) at config M (6 layers, 6 heads, 384 wide, T=256,
   B=8, V=8192): tinylm's forward under ``tinylm.no_grad()`` against PyTorch's forward of the
   same weights under ``torch.no_grad()`` (the nanoGPT-style model of benchmarks/train_step.py,
   loaded from tinylm's save_hf output). Each framework runs in its own process, rounds
   alternate, and the fastest round of each is compared; the mean loss of the first batch is
   printed for both, so the two computed the same thing.
2. HumanEval harness: problems per second executing the 164 canonical solutions (each in its
   own sandboxed process, tinylm.eval.humaneval) with 1 and 2 worker processes.

    python benchmarks/eval.py [--rounds 3] [--forwards 8] [--threads 2] [--skip-humaneval]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if sys.path and os.path.abspath(sys.path[0] or ".") == HERE:  # benchmarks/kernels.py would shadow kernels/
    sys.path[0] = ROOT

M = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=8, vocab_size=8192)


def _train_step_module():
    spec = importlib.util.spec_from_file_location("train_step_bench", os.path.join(HERE, "train_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _batches(n: int = 2):
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (M["batch"], M["block_size"])
    return [(rng.integers(0, M["vocab_size"], shape), rng.integers(0, M["vocab_size"], shape)) for _ in range(n)]


def worker(framework: str, init_dir: str, forwards: int, threads: int) -> dict:
    import numpy as np

    data = _batches()
    times = []
    if framework == "tinylm":
        import tinylm
        from tinylm.models import from_hf

        tinylm.set_num_threads(threads)
        model = from_hf(init_dir).eval()
        with tinylm.no_grad():
            first = float(model(data[0][0], data[0][1])[1].item())
            for i in range(1 + forwards):  # one untimed
                t0 = time.perf_counter()
                model(data[i % 2][0])
                times.append(time.perf_counter() - t0)
    else:
        import torch

        torch.set_num_threads(threads)
        model = _train_step_module().torch_model(M, init_dir).eval()
        xs = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in data]
        with torch.no_grad():
            first = float(model(*xs[0])[1])
            for i in range(1 + forwards):
                t0 = time.perf_counter()
                model(xs[i % 2][0])
                times.append(time.perf_counter() - t0)
    times = times[1:]
    tok = M["batch"] * M["block_size"]
    return {"min_ms": 1e3 * min(times), "median_ms": 1e3 * statistics.median(times), "tokens_per_s": tok / min(times),
            "first_loss": first, "rss_mib": _peak_mib(), "version": _version(framework)}


def _version(framework: str) -> str:
    if framework == "torch":
        import torch

        return torch.__version__
    import tinylm

    return tinylm.__version__


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(framework: str, init_dir: str, args) -> dict:
    env = dict(os.environ)
    n = str(args.threads)
    env.update(TINYLM_NUM_THREADS=n, NUMBA_NUM_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", framework, "--init-dir", init_dir,
                        "--forwards", str(args.forwards), "--threads", n], env=env, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"{framework} worker failed (exit {p.returncode}):\n{(p.stderr or p.stdout)[-3000:]}")
    return json.loads(lines[-1][7:])


def forward_benchmark(args) -> None:
    from tinylm.models import GPT, GPTConfig

    have_torch = importlib.util.find_spec("torch") is not None
    with tempfile.TemporaryDirectory() as d:
        GPT(GPTConfig(n_layer=M["n_layer"], n_head=M["n_head"], n_embd=M["n_embd"], block_size=M["block_size"],
                      vocab_size=M["vocab_size"]), seed=0).save_hf(d)
        best: dict = {}
        for r in range(args.rounds):
            for fw in ("tinylm", "torch") if have_torch else ("tinylm",):
                res = run_worker(fw, d, args)
                print(f"round {r + 1}/{args.rounds}: {fw:6s} {res['min_ms']:8.1f} ms/forward (median "
                      f"{res['median_ms']:.1f}), {res['tokens_per_s']:,.0f} tokens/s", flush=True)
                if fw not in best or res["min_ms"] < best[fw]["min_ms"]:
                    best[fw] = res
    print(f"\nforward, config M (B={M['batch']}, T={M['block_size']}, 6x384, V={M['vocab_size']}), no autograd, "
          f"{args.threads} threads, fastest of {args.rounds} rounds x {args.forwards} forwards\n")
    print("| framework | ms/forward | tokens/s | peak RSS MiB | first-batch loss |")
    print("|---|---|---|---|---|")
    for fw, r in best.items():
        name = "tinylm" if fw == "tinylm" else f"PyTorch {r['version']}"
        print(f"| {name} | {r['min_ms']:,.1f} | {r['tokens_per_s']:,.0f} | {r['rss_mib']:,.0f} | {r['first_loss']:.6f} |")
    if "torch" in best:
        ratio = best["tinylm"]["tokens_per_s"] / best["torch"]["tokens_per_s"]
        print(f"\ntokens/s ratio tinylm / PyTorch: {ratio:.2f} (target >= 1.0: {'met' if ratio >= 1.0 else 'MISSED'}); "
              f"first-batch loss difference {abs(best['tinylm']['first_loss'] - best['torch']['first_loss']):.1e}")
    else:
        print("\nPyTorch is not installed: no reference row")


def humaneval_benchmark() -> None:
    from tinylm.eval import humaneval as he

    try:
        problems = he.read_problems()
    except FileNotFoundError as e:
        print(f"\nHumanEval harness: skipped ({e})")
        return
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    print(f"\nHumanEval harness: the {len(samples)} canonical solutions, one sandboxed process each\n")
    print("| workers | seconds | problems/s | passed |")
    print("|---|---|---|---|")
    for w in (1, 2):
        t0 = time.perf_counter()
        res = he.check_samples(samples, problems, workers=w)
        dt = time.perf_counter() - t0
        print(f"| {w} | {dt:.1f} | {len(samples) / dt:.1f} | {sum(r['passed'] for r in res)}/{len(res)} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forwards", type=int, default=8)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--skip-humaneval", action="store_true")
    ap.add_argument("--worker", choices=("tinylm", "torch"))
    ap.add_argument("--init-dir")
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.init_dir, args.forwards, args.threads)))
        return 0
    print(f"machine: {os.cpu_count()} logical CPUs; load average before the run: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    forward_benchmark(args)
    if not args.skip_humaneval:
        humaneval_benchmark()
    return 0


if __name__ == "__main__":
    sys.exit(main())
