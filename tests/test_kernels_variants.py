"""Every CPU kernel variant equals its NumPy reference, on Hypothesis-drawn shapes and values.

The matrix is visible: one test per op family, parametrised over the variants listed in each
family's ``VARIANTS``, the lab's included (kernels/lab/; GPU variants are checked by tests/test_kernels_gpu.py under the CUDA
simulator). Domain (part of the spec): activations in [-3, 3] (GELU inputs in [-10, 10]),
logits scaled up to 30, sizes from 1 (T=1, C=1, V=1 included) to a few dozen, odd sizes
included. float32 is compared with float32 tolerance, float64 with a tight one.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernels import adamw, attention, cross_entropy, embedding, gelu, gradnorm, layernorm, matmul
from kernels.lab import attention as lab_attention
from kernels.lab import matmul as lab_matmul

DTYPES = [np.float32, np.float64]


def variants(module, op):
    return [name for name in module.VARIANTS[op] if name != "ref" and not name.startswith("gpu")]


def assert_close(got, want, dt, scale=1.0):
    """float32: rtol 1e-4 and atol 2e-5 * scale; float64: rtol 1e-9, atol 1e-11 * scale."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    m = scale * max(1.0, float(np.max(np.abs(want), initial=0.0)))
    if dt == np.float32:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * m)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11 * m)


def rand(rng, shape, dt, scale=1.0):
    return (scale * rng.uniform(-1, 1, shape)).astype(dt)


seeds = st.integers(0, 2**32 - 1)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", variants(layernorm, "layernorm_fwd"))
@given(N=st.integers(1, 9), C=st.integers(1, 70), seed=seeds)
def test_layernorm(name, dt, N, C, seed):
    rng = np.random.default_rng(seed)
    x, w, b, d = rand(rng, (N, C), dt, 3), rand(rng, C, dt, 2), rand(rng, C, dt), rand(rng, (N, C), dt)
    want = layernorm.layernorm_fwd_ref(x, w, b, 1e-5)
    got = layernorm.VARIANTS["layernorm_fwd"][name](x, w, b, 1e-5)
    for g, r in zip(got, want):
        assert_close(g, r, dt)
    want_b = layernorm.layernorm_bwd_ref(d, x, w, want[1], want[2])
    got_b = layernorm.VARIANTS["layernorm_bwd"][name](d, x, w, want[1], want[2])
    for g, r in zip(got_b, want_b):
        # dx of a C=1 row divides by a std of ~0, scale the tolerance by 1/sqrt(eps)'s size
        assert_close(g, r, dt, scale=1.0 if C > 1 else 10.0)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", variants(gelu, "gelu_fwd"))
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), seed=seeds)
def test_gelu(name, dt, shape, seed):
    rng = np.random.default_rng(seed)
    x, d = rand(rng, shape, dt, 10), rand(rng, shape, dt)
    assert_close(gelu.VARIANTS["gelu_fwd"][name](x), gelu.gelu_fwd_ref(x), dt)
    assert_close(gelu.VARIANTS["gelu_bwd"][name](d, x), gelu.gelu_bwd_ref(d, x), dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("tdt", [np.int64, np.int32])
@pytest.mark.parametrize("name", variants(cross_entropy, "cross_entropy_fwd"))
@given(N=st.integers(1, 9), V=st.integers(1, 300), scale=st.sampled_from([1.0, 5.0, 30.0]),
       seed=seeds)
def test_cross_entropy(name, tdt, dt, N, V, scale, seed):
    rng = np.random.default_rng(seed)
    z = rand(rng, (N, V), dt, scale)
    t = rng.integers(0, V, N).astype(tdt)
    t[rng.random(N) < 0.3] = -100
    dl = rand(rng, N, dt)
    want = cross_entropy.cross_entropy_fwd_ref(z, t, -100)
    got = cross_entropy.VARIANTS["cross_entropy_fwd"][name](z, t, -100)
    for g, r in zip(got, want):
        assert_close(g, r, dt)
    assert_close(cross_entropy.VARIANTS["cross_entropy_bwd"][name](z, t, want[1], dl, -100),
                 cross_entropy.cross_entropy_bwd_ref(z, t, want[1], dl, -100), dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", variants(lab_attention, "attention_fwd"))
@given(B=st.integers(1, 2), NH=st.integers(1, 3), T=st.integers(1, 40), hs=st.integers(1, 17),
       seed=seeds)
def test_attention(name, dt, B, NH, T, hs, seed):
    rng = np.random.default_rng(seed)
    q, k, v, d = (rand(rng, (B, NH, T, hs), dt, 2) for _ in range(4))
    want = attention.attention_fwd_ref(q, k, v)
    got = lab_attention.VARIANTS["attention_fwd"][name](q, k, v)
    for g, r in zip(got, want):
        assert_close(g, r, dt)
    want_b = attention.attention_bwd_ref(d, q, k, v, *want)
    got_b = lab_attention.VARIANTS["attention_bwd"][name](d, q, k, v, *want)
    for g, r in zip(got_b, want_b):
        assert_close(g, r, dt)


@pytest.mark.parametrize("dt", DTYPES)
@given(T=st.integers(1, 40), br=st.integers(1, 9), bc=st.integers(1, 9), seed=seeds)
def test_attention_flash_tiles(dt, T, br, bc, seed):
    """Tile sizes that do not divide T: partial query and key tiles, online-softmax rescaling."""
    rng = np.random.default_rng(seed)
    q, k, v, d = (rand(rng, (1, 2, T, 5), dt, 3) for _ in range(4))
    want = attention.attention_fwd_ref(q, k, v)
    for g, r in zip(lab_attention.attention_fwd_cpu_flash(q, k, v, br=br, bc=bc), want):
        assert_close(g, r, dt)
    want_b = attention.attention_bwd_ref(d, q, k, v, *want)
    for g, r in zip(lab_attention.attention_bwd_cpu_flash(d, q, k, v, *want, bc=bc), want_b):
        assert_close(g, r, dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("idt", [np.int64, np.int32])
@pytest.mark.parametrize("name", variants(embedding, "embedding_fwd"))
@given(shape=st.lists(st.integers(1, 12), min_size=1, max_size=2), V=st.integers(1, 20),
       C=st.integers(1, 40), seed=seeds)
def test_embedding(name, idt, dt, shape, V, C, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, shape).astype(idt)  # small V: duplicates are the rule
    w, d = rand(rng, (V, C), dt), rand(rng, tuple(shape) + (C,), dt)
    assert_close(embedding.VARIANTS["embedding_fwd"][name](ids, w), embedding.embedding_fwd_ref(ids, w), dt)
    assert_close(embedding.VARIANTS["embedding_bwd"][name](d, ids, V),
                 embedding.embedding_bwd_ref(d, ids, V), dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", variants(adamw, "adamw_update"))
@given(n=st.integers(1, 500), step=st.integers(1, 1000), lr=st.floats(1e-5, 1e-1),
       wd=st.sampled_from([0.0, 0.1]), seed=seeds)
def test_adamw(name, dt, n, step, lr, wd, seed):
    rng = np.random.default_rng(seed)
    p, g = rand(rng, n, dt), rand(rng, n, dt, 1e-2)
    m, v = rand(rng, n, dt, 1e-3), (rand(rng, n, dt, 1e-4) ** 2).astype(dt)
    want = [a.copy() for a in (p, g, m, v)]
    got = [a.copy() for a in (p, g, m, v)]
    adamw.adamw_update_ref(*want, lr, 0.9, 0.95, 1e-8, wd, step)
    assert adamw.VARIANTS["adamw_update"][name](*got, lr, 0.9, 0.95, 1e-8, wd, step) is None
    for a, b in zip(got, want):
        assert_close(a, b, dt)
    assert np.array_equal(got[1], g)  # the gradient is read-only


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", variants(gradnorm, "sumsq"))
@given(n=st.integers(0, 3000), scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=seeds)
def test_sumsq(name, dt, n, scale, seed):
    x = rand(np.random.default_rng(seed), n, dt, scale)
    got = gradnorm.VARIANTS["sumsq"][name](x)
    assert isinstance(got, float)
    # accumulated in float64 whatever the input: float32 inputs agree to float64 rounding
    assert got == pytest.approx(float(np.sum(x.astype(np.float64) ** 2)), rel=1e-12, abs=0)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", variants(lab_matmul, "matmul"))
@given(M=st.integers(1, 70), K=st.integers(1, 70), N=st.integers(1, 70), seed=seeds)
def test_matmul(name, dt, M, K, N, seed):
    rng = np.random.default_rng(seed)
    a, b = rand(rng, (M, K), dt), rand(rng, (K, N), dt)
    assert_close(lab_matmul.VARIANTS["matmul"][name](a, b), matmul.matmul_ref(a, b), dt, scale=K ** 0.5)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", variants(lab_attention, "attention_fwd"))
@given(B=st.integers(1, 2), NH=st.integers(1, 3), T=st.integers(1, 20), hs=st.integers(1, 9),
       seed=seeds)
def test_attention_strided_views(name, dt, B, NH, T, hs, seed):
    """q, k, v as views into a fused (B, T, 3, NH, hs) projection and dout as a view into
    (B, T, NH, hs), the way tinylm.functional.attention_qkv passes them (no copies)."""
    rng = np.random.default_rng(seed)
    heads = rand(rng, (B, T, 3, NH, hs), dt, 2).transpose(2, 0, 3, 1, 4)
    q, k, v = heads[0], heads[1], heads[2]
    d = rand(rng, (B, T, NH, hs), dt).transpose(0, 2, 1, 3)
    want = attention.attention_fwd_ref(q, k, v)
    got = lab_attention.VARIANTS["attention_fwd"][name](q, k, v)
    for g, r in zip(got, want):
        assert_close(g, r, dt)
    want_b = attention.attention_bwd_ref(d, q, k, v, *want)
    for g, r in zip(lab_attention.VARIANTS["attention_bwd"][name](d, q, k, v, *got), want_b):
        assert_close(g, r, dt)


@pytest.mark.parametrize("name", variants(gelu, "gelu_fwd"))
def test_gelu_strided_and_transposed(name):
    rng = np.random.default_rng(7)
    base = rand(rng, (6, 10), np.float64, 5)
    for x in (base.T, base[:, ::3], base[::2]):
        d = rand(rng, x.shape, np.float64)
        assert_close(gelu.VARIANTS["gelu_fwd"][name](x), gelu.gelu_fwd_ref(x), np.float64)
        assert_close(gelu.VARIANTS["gelu_bwd"][name](d, x), gelu.gelu_bwd_ref(d, x), np.float64)
