"""Data parallelism and ZeRO: N ranks = 1 rank, resume across rank counts and stages, faults,
prepare under MPI, and the per-rank memory of each stage against the ZeRO paper's formulas.

The multi-rank tests launch ``mpiexec -n 2/3`` (the mpich wheel's, next to this Python) on
``tinylm.distributed.selftest``; 3 ranks oversubscribe 2 cores, which MPICH allows.

Tolerances: the N-rank gradient is a sum of per-rank means, the 1-rank gradient one mean over
the same rows, so the sums are ordered differently and agree to rounding; after 20 steps of
AdamW with clipping, float64 agrees to 1e-10 and float32 to 1e-5 relative.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tinylm.distributed.shard import Layout

MPIEXEC = Path(sys.executable).parent / "mpiexec"
try:
    import mpi4py  # noqa: F401

    HAVE_MPI = MPIEXEC.exists()
except ImportError:
    HAVE_MPI = False
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec (pip install -e '.[mpi]')")
ENV = dict(os.environ, TINYLM_NUM_THREADS="1", TINYLM_COMM_TIMEOUT="60")


def run(n, out, *args, timeout=240, check=True):
    cmd = [sys.executable, "-m", "tinylm.distributed.selftest", "--out", str(out), *map(str, args)]
    if n > 1:
        cmd = [str(MPIEXEC), "-n", str(n), *cmd]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def result(out):
    return json.loads((Path(out) / "result.json").read_text()), np.load(Path(out) / "weights.npy")


# ---- the arithmetic of shards ----------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 10, 11, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_layout_partitions_every_range(n, world):
    for a, b in [(0, n), (0, n // 2), (n // 3, n), (n // 2, n // 2 + 1)]:
        if b <= a:
            continue
        counts = [0] * world
        for r in range(world):
            L = Layout(n, world, r)
            assert L.size * world == L.padded >= n and L.padded - n < world
            c, d = L.split(a, b)
            counts[r] = c[r]
            d0, s0, cnt = L.mine(a, b)
            assert cnt == c[r] and (cnt == 0 or (d0 == d[r] and s0 + L.owned()[0] == a + d0))
        assert sum(counts) == b - a
        assert Layout(n, world, 0).split(a, b)[0] == counts


# ---- stages in one process (SingleProcess communicator): the same run as no communicator ------
def _tiny_run(comm, zero, steps=4):
    from tinylm.models import GPT, GPTConfig
    from tinylm.train.loop import Trainer
    from tinylm.train.objectives import NextToken
    from tinylm.train.pretrain import BatchSampler

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, dtype="float64"), seed=3)
    tokens = np.random.default_rng(0).integers(0, 32, 800)
    cfg = SimpleNamespace(lr=3e-3, min_lr=3e-4, warmup_steps=1, max_steps=steps, grad_accum=2, grad_clip=0.05,
                          weight_decay=0.1, beta1=0.9, beta2=0.95, eval_interval=10**6, log_interval=1,
                          time_budget=0, progress=False, keep_checkpoints=1, save_on_interrupt=False, bucket_mb=0.001)
    tr = Trainer(model, NextToken(), BatchSampler(tokens, 4, 8, 5), cfg, "/nonexistent-never-written", None,
                 meta=dict, comm=comm, zero=zero)
    tr.out = Path(os.environ["TINYLM_TEST_TMP"])
    res = tr.run()
    if comm is not None:
        tr.opt.materialize()
    return res["train_losses"], np.concatenate([p.data.reshape(-1) for _, p in sorted(model.named_parameters())])


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_single_process_communicator_matches_no_communicator(zero, tmp_path, monkeypatch):
    from tinylm.distributed import SingleProcess

    monkeypatch.setenv("TINYLM_TEST_TMP", str(tmp_path))
    monkeypatch.setattr("tinylm.train.loop.Trainer.save", lambda self: None)
    ref_l, ref_w = _tiny_run(None, 0)
    l, w = _tiny_run(SingleProcess(), zero)
    np.testing.assert_allclose(l, ref_l, rtol=1e-12)
    np.testing.assert_allclose(w, ref_w, rtol=0, atol=1e-12)


# ---- memory: bytes per parameter read from the buffers, against the paper ----------------------
class _Rank:
    """Shapes a ZeroOptimizer as rank ``rank`` of ``size`` without communicating (building one
    does not communicate)."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def memory_table(world=2):
    from tinylm.distributed.zero import ZeroOptimizer
    from tinylm.models import GPT, GPTConfig
    from tinylm.optim import ParamStore

    rows = {}
    for fmt, dt in (("mixed (fp16 + fp32 masters)", np.float16), ("fp32", np.float32)):
        for stage in range(4):
            per_rank = []
            for r in range(world):
                model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64), seed=0)
                for p in model.parameters():
                    p.data = p.data.astype(dt)
                store = ParamStore.for_model(model, 0.1)
                psi = store.numel()
                opt = ZeroOptimizer(store, _Rank(r, world), stage, model=model)
                per_rank.append(opt.nbytes())
            rows[(fmt, stage)] = (psi, per_rank)
    return rows


def test_memory_per_rank_matches_the_zero_formulas():
    n = 2
    want = {("mixed (fp16 + fp32 masters)", 0): 16, ("mixed (fp16 + fp32 masters)", 1): 4 + 12 / n,
            ("mixed (fp16 + fp32 masters)", 2): 2 + 14 / n, ("mixed (fp16 + fp32 masters)", 3): 16 / n,
            ("fp32", 0): 16, ("fp32", 1): 8 + 8 / n, ("fp32", 2): 4 + 12 / n, ("fp32", 3): 16 / n}
    for key, (psi, per_rank) in memory_table(n).items():
        for nb in per_rank:
            # padding: each group adds < n elements to a shard (GPT has 2 groups)
            assert abs(nb["total"] / psi - want[key]) < 16 * 2 * n / psi, (key, nb, psi)


# ---- N ranks = 1 rank, every stage (mpiexec) -----------------------------------------------------
@needs_mpi
@pytest.mark.slow
def test_losses_and_weights_equal_at_1_2_3_ranks_every_stage(tmp_path):
    run(1, tmp_path / "ref")
    ref, ref_w = result(tmp_path / "ref")
    assert len(ref["losses"]) == 20
    for n in (2, 3):
        for zero in (0, 1, 2, 3):
            out = tmp_path / f"n{n}z{zero}"
            run(n, out, "--zero", zero)
            r, w = result(out)
            np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-10, err_msg=f"{n} ranks, zero={zero}")
            np.testing.assert_allclose(w, ref_w, rtol=1e-10, atol=1e-10, err_msg=f"{n} ranks, zero={zero}")


@needs_mpi
@pytest.mark.slow
def test_float32_equal_to_1e5(tmp_path):
    run(1, tmp_path / "ref", "--dtype", "float32")
    ref, ref_w = result(tmp_path / "ref")
    for n, zero in ((2, 1), (3, 3)):
        out = tmp_path / f"n{n}z{zero}"
        run(n, out, "--zero", zero, "--dtype", "float32")
        r, w = result(out)
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5)
        np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-5 * np.abs(ref_w).max())


@needs_mpi
@pytest.mark.slow
def test_resume_a_2_rank_zero2_checkpoint_on_1_and_3_ranks(tmp_path):
    run(1, tmp_path / "ref")
    ref, ref_w = result(tmp_path / "ref")
    run(2, tmp_path / "ck", "--zero", 2, "--stop-at", 10)
    import shutil

    for n, zero in ((1, 0), (3, 2), (3, 3)):
        d = tmp_path / f"resume{n}z{zero}"
        shutil.copytree(tmp_path / "ck", d, symlinks=True)
        run(n, d, "--zero", zero, "--resume")
        r, w = result(d)
        assert r["steps"] == 20 and len(r["losses"]) == 10
        np.testing.assert_allclose(r["losses"], ref["losses"][10:], rtol=1e-10, err_msg=f"{n} ranks zero={zero}")
        np.testing.assert_allclose(w, ref_w, rtol=1e-10, atol=1e-10)


# ---- faults: every rank ends, with a message naming the rank -----------------------------------------
@needs_mpi
def test_a_killed_rank_ends_every_rank_with_its_name(tmp_path):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "tinylm.distributed.launch", "-n", "2", "--", sys.executable, "-m",
                        "tinylm.distributed.selftest", "--out", str(tmp_path), "--die-at", "3", "--timeout", "20"],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "tinylm: rank 1 (pid" in p.stderr and "ended abnormally" in p.stderr, p.stderr[-2000:]


@needs_mpi
def test_an_exception_on_one_rank_aborts_every_rank(tmp_path):
    t0 = time.monotonic()
    p = run(3, tmp_path, "--raise-at", 3, check=False, timeout=120)
    assert p.returncode != 0 and time.monotonic() - t0 < 60
    assert "rank 1 of 3 failed" in p.stderr and "a failure on rank 1" in p.stderr, p.stderr[-2000:]


# ---- prepare under mpiexec: the same shards as one process --------------------------------------------
@needs_mpi
def test_prepare_at_2_ranks_writes_the_shards_of_1(tmp_path):
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    docs = [" ".join(rng.choice(words, rng.integers(30, 300))) for _ in range(60)]
    src = tmp_path / "in"
    src.mkdir()
    with open(src / "a.jsonl", "w") as f:
        for d in docs[:40]:
            f.write(json.dumps({"text": d}) + "\n")
    with open(src / "b.jsonl", "w") as f:  # duplicates of documents another rank cleans
        for d in docs[40:] + docs[:8] + [d + " lambda" for d in docs[8:16]]:
            f.write(json.dumps({"text": d}) + "\n")
    script = ("import sys; from tinylm.data.pipeline import prepare; prepare([sys.argv[1]], sys.argv[2], "
              "vocab_size=300, dedup='near', batch_bytes=4096, progress=False)")
    for n in (1, 2):
        cmd = [sys.executable, "-c", script, str(src), str(tmp_path / f"p{n}")]
        subprocess.run(([str(MPIEXEC), "-n", "2"] if n == 2 else []) + cmd, env=ENV, check=True, timeout=120,
                       capture_output=True)
    a, b = tmp_path / "p1", tmp_path / "p2"
    assert sorted(x.name for x in a.iterdir()) == sorted(x.name for x in b.iterdir())
    for f in a.iterdir():
        if f.suffix == ".npy" or f.name == "tokenizer.json":
            assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m["report"].pop("seconds"), m["report"].pop("mb_per_s")
    assert ma == mb
    assert ma["report"]["dedup"]["exact_duplicates"] == 8 and ma["report"]["dedup"]["near_duplicates"] > 0
