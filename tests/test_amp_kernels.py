"""Every kernel family with bf16 and fp16 inputs against its fp32 reference, within the
per-format tolerance table (kernels/_lowp.py TOLERANCE): on the CPU here, and the GPU kernels
under Numba's CUDA simulator in a subprocess (the simulator must be on before numba.cuda is
imported). The cases are kernels/_gpucheck.py's: several blocks per launch, extreme logits,
saturated gates, grouped-query attention."""

import numpy as np
import pytest

import kernels
from kernels._gpucheck import FAMILIES, check_16bit
from kernels._lowp import ACTIVATION_OUTPUTS, TOLERANCE

OPS = sorted(op for fam in FAMILIES for op in __import__(f"kernels.{fam}", fromlist=["VARIANTS"]).VARIANTS)


def test_every_op_has_a_16bit_rule():
    assert set(OPS) <= set(ACTIVATION_OUTPUTS)


@pytest.mark.parametrize("backend", ["cpu", "ref"])
def test_16bit_inputs_match_the_fp32_reference(backend):
    rows = check_16bit(backend)
    assert {(op, fmt) for op, fmt, *_ in rows} == {(op, f) for op in OPS for f in TOLERANCE}
    bad = [r for r in rows if not r[-1]]
    assert not bad, bad


def test_outputs_keep_the_format_and_statistics_stay_fp32():
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float16)
    w, b = np.ones(8, np.float16), np.zeros(8, np.float16)
    out, mean, rstd = kernels.get("layernorm_fwd", x)(x, w, b, 1e-5)
    assert out.dtype == np.float16 and mean.dtype == rstd.dtype == np.float32
    xb = x.astype(np.float32).view(np.uint32)
    xb = (xb >> 16).astype(np.uint16)  # bf16 bits (truncated: any bf16 will do)
    out = kernels.get("gelu_fwd", xb)(xb)
    assert out.dtype == np.uint16
    loss, lse = kernels.get("cross_entropy_fwd", xb)(xb, np.array([1, 2, 3, 0]), -100)
    assert loss.dtype == lse.dtype == np.float32  # log-probabilities in fp32


def test_fp32_gets_the_kernel_itself():
    x = np.zeros((2, 3), np.float32)
    fn = kernels.get("gelu_fwd", x)
    assert not hasattr(fn, "__wrapped__") and fn is kernels.get("gelu_fwd", x, backend="cpu")


def test_mixed_formats_in_one_call_are_refused():
    a, b = np.zeros((2, 3), np.uint16), np.zeros((3, 2), np.float16)
    with pytest.raises(TypeError, match="mixed"):
        kernels.get("matmul", a, b)(a, b)


@pytest.mark.slow
def test_16bit_gpu_kernels_under_simulator(gpucheck):
    rc, out = gpucheck["sim16"]  # tests/conftest.py: run beside the other simulator checks
    for op in OPS:
        for fmt in TOLERANCE:
            assert f"OK sim16 {op} gpu {fmt}:" in out, out
    assert "FAIL" not in out and rc == 0, out
