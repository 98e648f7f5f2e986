"""GPU kernels without a GPU: the CUDA simulator against the references, and PTX for sm_80/sm_90.

Each mode runs ``python -m kernels._gpucheck`` in a subprocess (the simulator has to be switched
on before numba.cuda is first imported; compile_ptx needs it off), the three modes side by side
(tests/conftest.py, ``gpucheck``), and the test asserts on the
per-kernel lines, against the list below, so a kernel that disappears from the checker fails.
A real-GPU run (CuPy arrays) is in ``test_real_gpu``, skipped where there is none.
"""
import sys

import numpy as np
import pytest


GPU_OPS = [  # (op, variant) of every GPU variant in the VARIANTS tables, kernels/lab/ included
    ("layernorm_fwd", "gpu"), ("layernorm_bwd", "gpu"), ("gelu_fwd", "gpu"), ("gelu_bwd", "gpu"),
    ("cross_entropy_fwd", "gpu"), ("cross_entropy_bwd", "gpu"), ("attention_fwd", "gpu"),
    ("attention_bwd", "gpu"), ("embedding_fwd", "gpu"), ("embedding_bwd", "gpu"),
    ("adamw_update", "gpu"), ("sumsq", "gpu"), ("matmul", "gpu"), ("matmul", "gpu_numba"),
    ("matmul_acc", "gpu"), ("rmsnorm_fwd", "gpu"), ("rmsnorm_bwd", "gpu"), ("rope_fwd", "gpu"),
    ("rope_bwd", "gpu"), ("swiglu_fwd", "gpu"), ("swiglu_bwd", "gpu"), ("head_ce", "gpu"),
]
PTX_KERNELS = [
    "layernorm_fwd", "layernorm_bwd_dx", "layernorm_bwd_dwdb", "gelu_fwd", "gelu_bwd",
    "cross_entropy_fwd", "cross_entropy_bwd", "attention_fwd", "attention_bwd_dq",
    "attention_bwd_dkdv", "embedding_fwd", "embedding_bwd", "adamw_update", "sumsq",
    "matmul_gpu_numba", "rmsnorm_fwd", "rmsnorm_bwd_dx", "rmsnorm_bwd_dw", "rope", "swiglu_fwd",
    "swiglu_bwd",
]


def test_variant_tables_list_the_gpu_ops():
    from kernels._gpucheck import FAMILIES
    from kernels.lab import variants
    found = sorted((op, name) for fam in FAMILIES
                   for op, t in variants(fam).items()
                   for name in t if name.startswith("gpu"))
    assert found == sorted(GPU_OPS)


def test_gpu_kernels_under_simulator(gpucheck):
    rc, out = gpucheck["sim"]
    for op, name in GPU_OPS:
        for dt in ("float32", "float64"):
            assert f"OK sim {op} {name} {dt}:" in out, out
    assert "FAIL" not in out and rc == 0, out


@pytest.mark.slow
def test_gpu_kernels_compile_to_ptx(gpucheck):
    pytest.importorskip("numba.cuda")
    rc, out = gpucheck["ptx"]
    for k in PTX_KERNELS:
        for cc in ("sm_80", "sm_90"):
            assert f"OK ptx {k} {cc}:" in out, out
    assert "FAIL" not in out and rc == 0, out


def test_gpu_unavailable_is_explained(monkeypatch):
    """Without CuPy the GPU backend says why it is unavailable (instead of failing later)."""
    from kernels._common import gpu_unavailable_reason
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    why = gpu_unavailable_reason()
    assert why is not None and "CuPy is not importable" in why
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")  # the simulator needs neither CuPy nor a GPU
    assert gpu_unavailable_reason() is None


@pytest.mark.gpu
def test_real_gpu():
    cupy = pytest.importorskip("cupy")
    from kernels._common import gpu_unavailable_reason
    if gpu_unavailable_reason():
        pytest.skip(gpu_unavailable_reason())
    from kernels import attention, cross_entropy, layernorm
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 384)).astype(np.float32)
    w, b = np.ones(384, np.float32), np.zeros(384, np.float32)
    got = layernorm.layernorm_fwd_gpu(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b), 1e-5)
    for g, r in zip(got, layernorm.layernorm_fwd_ref(x, w, b, 1e-5)):
        np.testing.assert_allclose(cupy.asnumpy(g), r, rtol=1e-4, atol=1e-5)
    z = rng.standard_normal((64, 1000)).astype(np.float32)
    t = rng.integers(0, 1000, 64)
    got = cross_entropy.cross_entropy_fwd_gpu(cupy.asarray(z), cupy.asarray(t), -100)
    for g, r in zip(got, cross_entropy.cross_entropy_fwd_ref(z, t, -100)):
        np.testing.assert_allclose(cupy.asnumpy(g), r, rtol=1e-4, atol=1e-5)
    q = rng.standard_normal((2, 3, 70, 16)).astype(np.float32)
    got = attention.attention_fwd_gpu(*(cupy.asarray(q) for _ in range(3)))
    for g, r in zip(got, attention.attention_fwd_ref(q, q, q)):
        np.testing.assert_allclose(cupy.asnumpy(g), r, rtol=1e-4, atol=1e-5)
