"""BLAS called from Numba threads: the GEMM binding, the Numba-threaded matmul and cpu_gemm attention.

The variant matrix (tests/test_kernels_variants.py) already checks both kernels against their
references on small C-contiguous inputs; this file covers what that matrix does not reach:
several query tiles (attention tiles of 1-9 rows), every stride layout the matmul accepts or
must hand back to NumPy, the fallbacks when no callable GEMM exists, and the thread settings
being restored.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernels import _blas, attention, matmul
from kernels.lab import attention as lab_attention
from kernels._blas import _openblas_libs
from kernels._threads import blas_num_threads, set_blas_threads, set_num_threads

ROOT = Path(__file__).resolve().parents[1]
seeds = st.integers(0, 2**32 - 1)
DTYPES = [np.float32, np.float64]


def close(got, want, dt, scale=1.0):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    m = scale * max(1.0, float(np.max(np.abs(want), initial=0.0)))
    tol = (1e-4, 2e-5 * m) if dt == np.float32 else (1e-9, 1e-11 * m)
    np.testing.assert_allclose(got, want, rtol=tol[0], atol=tol[1])


def test_gemm_is_found_where_numpy_ships_openblas():
    for dt in DTYPES:
        fn = _blas.gemm_for(dt)
        assert (fn is not None) == bool(_openblas_libs())
    assert _blas.gemm_for(np.float16) is None
    assert _blas.gemm_for(np.int64) is None


def test_blas_single_threaded_restores_the_count_even_on_error():
    if blas_num_threads() is None:
        pytest.skip("no OpenBLAS loaded: nothing to set")
    set_blas_threads(2)  # as a user who sized OpenBLAS's pool after tinylm set it to 1
    try:
        with _blas.blas_single_threaded():
            assert blas_num_threads() == 1
        assert blas_num_threads() == 2
        with pytest.raises(RuntimeError), _blas.blas_single_threaded():
            raise RuntimeError("boom")
        assert blas_num_threads() == 2
    finally:
        set_blas_threads(1)


# ---- cpu_gemm attention: several tiles, partial last tile, reversed tile order in backward --

@pytest.mark.parametrize("dt", DTYPES)
@given(B=st.integers(1, 2), NH=st.integers(1, 3), T=st.integers(1, 40), hs=st.integers(1, 9),
       br=st.integers(1, 9), seed=seeds)
def test_attention_gemm_tiles(dt, B, NH, T, hs, br, seed):
    rng = np.random.default_rng(seed)
    q, k, v, d = (rng.uniform(-2, 2, (B, NH, T, hs)).astype(dt) for _ in range(4))
    want = attention.attention_fwd_ref(q, k, v)
    for g, r in zip(attention.attention_fwd_cpu_gemm(q, k, v, br=br), want):
        close(g, r, dt)
    want_b = attention.attention_bwd_ref(d, q, k, v, *want)
    for g, r in zip(attention.attention_bwd_cpu_gemm(d, q, k, v, *want, br=br), want_b):
        close(g, r, dt)


def test_attention_gemm_ignores_what_it_overwrites():
    """Outputs come from np.empty; with NaN already in memory the result must not change."""
    rng = np.random.default_rng(3)
    q, k, v, d = (rng.standard_normal((2, 2, 23, 8)) for _ in range(4))
    want = attention.attention_fwd_ref(q, k, v)
    want_b = attention.attention_bwd_ref(d, q, k, v, *want)
    for _ in range(3):  # freed NaN-filled blocks are what the next np.empty tends to return
        junk = [np.full(q.shape, np.nan) for _ in range(6)]
        del junk
        got = attention.attention_fwd_cpu_gemm(q, k, v, br=5)
        got_b = attention.attention_bwd_cpu_gemm(d, q, k, v, *want, br=5)
        for g, r in zip((*got, *got_b), (*want, *want_b)):
            assert np.all(np.isfinite(g))
            close(g, r, np.float64)


def test_attention_gemm_falls_back_to_batched_blas(monkeypatch):
    monkeypatch.setattr(attention, "_gemm_or_none", lambda q: None)
    called = []
    real = lab_attention.attention_fwd_cpu_blas
    monkeypatch.setattr(lab_attention, "attention_fwd_cpu_blas", lambda *a: called.append(1) or real(*a))
    rng = np.random.default_rng(4)
    q, k, v, d = (rng.standard_normal((1, 2, 9, 4)).astype(np.float32) for _ in range(4))
    want = attention.attention_fwd_ref(q, k, v)
    for g, r in zip(attention.attention_fwd_cpu_gemm(q, k, v), want):
        close(g, r, np.float32)
    assert called == [1]
    want_b = attention.attention_bwd_ref(d, q, k, v, *want)
    for g, r in zip(attention.attention_bwd_cpu_gemm(d, q, k, v, *want), want_b):
        close(g, r, np.float32)


# ---- the Numba-threaded matmul ------------------------------------------------------------

def _layout(rng, shape, kind, dt):
    """An array of `shape` stored as: C order, a transpose (F order), a column slice of a wider
    array or every other row (leading dimension > columns), or every other column (no BLAS
    layout: NumPy's path)."""
    r, c = shape
    if kind == "c":
        return rng.uniform(-1, 1, shape).astype(dt)
    if kind == "t":
        return rng.uniform(-1, 1, (c, r)).astype(dt).T
    if kind == "wide":
        return rng.uniform(-1, 1, (r, c + 3)).astype(dt)[:, 1:c + 1]
    if kind == "rows":
        return rng.uniform(-1, 1, (2 * r, c)).astype(dt)[::2]
    return rng.uniform(-1, 1, (r, 2 * c)).astype(dt)[:, ::2]


KINDS = st.sampled_from(["c", "t", "wide", "rows", "strided"])


def test_layouts_map_to_blas_flags():
    rng = np.random.default_rng(0)
    kinds = ("c", "t", "wide", "rows", "strided")
    got = {k: matmul._blas_layout(_layout(rng, (5, 4), k, np.float32)) for k in kinds}
    assert got == {"c": (111, 4), "t": (112, 5), "wide": (111, 7), "rows": (111, 8), "strided": None}


@pytest.mark.parametrize("dt", DTYPES)
@given(M=st.integers(1, 90), K=st.integers(1, 40), N=st.integers(1, 90), ka=KINDS, kb=KINDS,
       seed=seeds)
def test_matmul_every_layout(dt, M, K, N, ka, kb, seed):
    rng = np.random.default_rng(seed)
    a, b = _layout(rng, (M, K), ka, dt), _layout(rng, (K, N), kb, dt)
    close(matmul.matmul_cpu(a, b), a @ b, dt, scale=K ** 0.5)


@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_splits_rows_or_columns_alike(threads):
    n = set_num_threads(threads)
    try:
        rng = np.random.default_rng(5)
        for M, N in ((301, 7), (7, 301), (1, 50), (50, 1)):  # taller: rows split; wider: columns
            a, b = rng.standard_normal((M, 33)), rng.standard_normal((33, N))
            close(matmul.matmul_cpu(a, b), a @ b, np.float64, scale=6)
    finally:
        set_num_threads(max(n, 2) if threads == 1 else n)


def test_matmul_hands_other_cases_to_numpy():
    rng = np.random.default_rng(6)
    i = rng.integers(-5, 5, (4, 3))
    assert np.array_equal(matmul.matmul_cpu(i, i.T), i @ i.T)  # integers
    a32, b64 = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((3, 2))
    np.testing.assert_allclose(matmul.matmul_cpu(a32, b64), a32 @ b64)  # mixed dtypes
    assert matmul.matmul_cpu(np.ones((0, 3)), np.ones((3, 4))).shape == (0, 4)
    np.testing.assert_array_equal(matmul.matmul_cpu(np.ones((2, 0)), np.ones((0, 4))), np.zeros((2, 4)))


def _tinylm_in_subprocess(code, **env):
    e = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    r = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_tuning_is_applied_and_can_be_turned_off():
    code = "import tinylm, tinylm._malloc as m; print(m._done['ok'])"
    assert _tinylm_in_subprocess(code) == "True"
    assert _tinylm_in_subprocess(code, TINYLM_MALLOC_TUNE="0") == "False"


@pytest.mark.parametrize("dt", DTYPES)
@given(M=st.integers(1, 60), K=st.integers(1, 30), N=st.integers(1, 60), ka=KINDS, kb=KINDS,
       kc=st.sampled_from(["c", "wide", "t", "strided"]), seed=seeds)
def test_matmul_acc_adds_in_place(dt, M, K, N, ka, kb, kc, seed):
    """c += a @ b into c's own memory, for every layout of c (a transposed or strided c is
    handed to NumPy's path, which must still write in place)."""
    rng = np.random.default_rng(seed)
    a, b, c = _layout(rng, (M, K), ka, dt), _layout(rng, (K, N), kb, dt), _layout(rng, (M, N), kc, dt)
    want = c + a @ b
    before = c.__array_interface__["data"][0]
    matmul.matmul_acc_cpu(a, b, c)
    assert c.__array_interface__["data"][0] == before
    close(c, want, dt, scale=K ** 0.5)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("N", [5, 300, 2 * matmul.GEMV_COLS_PER_THREAD + 3])  # direct / split
@pytest.mark.parametrize("ka", ["c", "t", "rows"])
@pytest.mark.parametrize("kb", ["c", "t", "wide"])
def test_matmul_one_row_goes_through_gemv(dt, N, ka, kb, monkeypatch):
    calls = []
    real = _blas.gemv_for
    monkeypatch.setattr(matmul, "gemv_for", lambda d: calls.append(d) or real(d))
    rng = np.random.default_rng(8)
    a, b = _layout(rng, (1, 37), ka, dt), _layout(rng, (37, N), kb, dt)
    close(matmul.matmul_cpu(a, b), a @ b, dt, scale=6)
    c = _layout(rng, (1, N), "c", dt)
    want = c + a @ b
    matmul.matmul_acc_cpu(a, b, c)
    close(c, want, dt, scale=6)
    assert len(calls) == 2 and (real(dt) is not None) == bool(_openblas_libs())


def test_without_a_callable_openblas_numba_waits_passively():
    """Simulate NumPy on another BLAS: no GEMM to bind. tinylm then asks for passive OpenMP
    waiting before Numba's pool starts; with OpenBLAS found it leaves libgomp's default."""
    code = ("import os, kernels._blas as b, kernels._threads as t\n"
            "if os.environ.get('FAKE_NO_BLAS'): b._cache[('gemm', __import__('numpy').dtype('float32'))] = None\n"
            "t.apply_env(); print(os.environ.get('OMP_WAIT_POLICY', 'unset'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    outs = []
    for fake in ("", "1"):
        r = subprocess.run([sys.executable, "-c", code], env=dict(env, FAKE_NO_BLAS=fake),
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.strip())
    assert outs == ["unset" if _openblas_libs() else "PASSIVE", "PASSIVE"]
