"""Registry dispatch, TINYLM_KERNELS=ref, and the thread settings."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kernels
from kernels import registry

ROOT = Path(__file__).resolve().parents[1]
OPS = sorted(registry._FAMILY)


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_ref_cpu_gpu(op):
    assert kernels.available(op) == ["ref", "cpu", "gpu"]


@pytest.mark.parametrize("op", OPS)
def test_variant_table_agrees_with_registry(op):
    import importlib
    table = importlib.import_module(registry._FAMILY[op]).VARIANTS[op]
    assert table["ref"] is kernels.get(op, backend="ref")
    assert table["gpu"] is kernels.get(op, backend="gpu")
    assert kernels.get(op, backend="cpu") in table.values()


def test_numpy_arrays_pick_cpu_and_env_forces_ref(monkeypatch):
    x = np.zeros((2, 3), np.float32)
    from kernels import layernorm
    monkeypatch.delenv("TINYLM_KERNELS", raising=False)
    assert kernels.get("layernorm_fwd", x) is layernorm.layernorm_fwd_cpu
    monkeypatch.setenv("TINYLM_KERNELS", "ref")
    assert kernels.get("layernorm_fwd", x) is layernorm.layernorm_fwd_ref


def test_attention_cpu_is_one_of_the_variants():
    from kernels import attention
    fwd = kernels.get("attention_fwd", backend="cpu")
    name = next(n for n, f in attention.VARIANTS["attention_fwd"].items() if f is fwd)
    assert name.startswith("cpu_")
    assert kernels.get("attention_bwd", backend="cpu") is attention.VARIANTS["attention_bwd"][name]


def _threads_in_subprocess(env_value):
    code = ("import numpy, numba; from kernels import _threads as t; n = t.apply_env(); "
            "print(n, numba.get_num_threads(), t.blas_num_threads())")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TINYLM_NUM_THREADS", None)
    if env_value is not None:
        env["TINYLM_NUM_THREADS"] = env_value
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    return r


def test_tinylm_num_threads_sets_numba_and_blas_together():
    """TINYLM_NUM_THREADS sizes Numba's pool, which runs tinylm's GEMMs too; OpenBLAS's own
    pool is held at 1 so the two never compete for cores."""
    r = _threads_in_subprocess("1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1", "1"]
    r = _threads_in_subprocess("2")
    assert r.returncode == 0, r.stderr
    import numba
    want = str(min(2, int(os.environ.get("NUMBA_NUM_THREADS", 2)), numba.config.NUMBA_NUM_THREADS))
    assert r.stdout.split() == [want, want, "1"]


def test_threads_default_is_the_cores():
    from kernels._threads import default_threads
    r = _threads_in_subprocess(None)
    assert r.returncode == 0, r.stderr
    n = default_threads()
    n = min(n, int(os.environ.get("NUMBA_NUM_THREADS", n)))  # Numba's pool is the ceiling
    assert r.stdout.split() == [str(n), str(n), "1"]


def test_bad_thread_setting_is_an_error():
    r = _threads_in_subprocess("zero")
    assert r.returncode != 0 and "TINYLM_NUM_THREADS" in r.stderr


def test_set_num_threads_round_trip():
    from kernels import _threads
    import numba
    before = numba.get_num_threads()
    try:
        assert _threads.set_num_threads(1) == 1
        assert numba.get_num_threads() == 1 and _threads.get_num_threads() == 1
        assert _threads.blas_num_threads() == 1
    finally:
        _threads.set_num_threads(before)
    with pytest.raises(ValueError):
        _threads.set_num_threads(0)
