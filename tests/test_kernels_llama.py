"""The Llama ops: RMSNorm, RoPE, SwiGLU and grouped-query attention, kernels and functional.

Kernels: every CPU variant equals its NumPy reference (float32 with float32 tolerance, float64
tight), on Hypothesis-drawn shapes; GPU variants are checked under the CUDA simulator by
tests/test_kernels_gpu.py. Functional ops: float64 gradients against finite differences
(``tinylm.gradcheck``) and against the same math composed from the primitives in tinylm.ops.
Properties: RoPE's two pair layouts give the same attention scores under the matching channel
permutation, position 0 is the identity, rotations keep norms, scores depend only on the
position difference; GQA with NKV = NH is standard attention, and GQA equals standard attention
on keys and values repeated per group.

Domain (part of the spec): activations in [-3, 3] (RMSNorm rows kept away from all-zero in
gradchecks, where 1/sqrt(mean(x^2) + eps) is stiff; SwiGLU gates up to |a| = 30, and
+-100/+-1000 tested explicitly), sizes from 1 (T=1, C=1 included) to a few dozen, odd sizes
included, head sizes even (RoPE needs pairs), positions up to 4096.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernels import rmsnorm, rope, swiglu
from tinylm import F, gradcheck, tensor

DTYPES = [np.float32, np.float64]
seeds = st.integers(0, 2**32 - 1)


def variants(module, op):
    return [name for name in module.VARIANTS[op] if name != "ref" and not name.startswith("gpu")]


def assert_close(got, want, dt, scale=1.0):
    """Every element, shape and dtype: float32 rtol 1e-4, atol 2e-5 * scale; float64 rtol 1e-9,
    atol 1e-11 * scale; scale grows with the largest |want|."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.all(np.isfinite(got) == np.isfinite(want))
    m = scale * max(1.0, float(np.max(np.abs(want), initial=0.0)))
    if dt == np.float32:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * m)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11 * m)


def rand(rng, shape, dt, scale=1.0):
    return (scale * rng.uniform(-1, 1, shape)).astype(dt)


def leaf(a):
    return tensor(np.array(a, dtype=np.float64), requires_grad=True)


def assert_same_as_composed(fused, composed, arrays, rtol=1e-9, atol=1e-11):
    """Outputs and input gradients (for one random output weighting) of the two agree."""
    res = []
    for fn in (fused, composed):
        ts = [leaf(a) for a in arrays]
        out = fn(*ts)
        out.backward(np.random.default_rng(1).standard_normal(out.shape))
        res.append([out.numpy()] + [t.grad for t in ts])
    for f, c in zip(*res):
        np.testing.assert_allclose(f, c, rtol=rtol, atol=atol)


# ---- RMSNorm kernels ------------------------------------------------------------------------
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", variants(rmsnorm, "rmsnorm_fwd"))
@given(N=st.integers(1, 9), C=st.integers(1, 70), seed=seeds)
def test_rmsnorm_kernel(name, dt, N, C, seed):
    rng = np.random.default_rng(seed)
    x, w, d = rand(rng, (N, C), dt, 3), rand(rng, C, dt, 2), rand(rng, (N, C), dt)
    want = rmsnorm.rmsnorm_fwd_ref(x, w, 1e-6)
    got = rmsnorm.VARIANTS["rmsnorm_fwd"][name](x, w, 1e-6)
    for g, r in zip(got, want):
        assert_close(g, r, dt)
    rstd = want[1]
    got_b = rmsnorm.VARIANTS["rmsnorm_bwd"][name](d, x, w, rstd)
    # dx scales with rstd (up to 1/sqrt(eps) for a row of tiny values): so does its rounding
    for g, r in zip(got_b, rmsnorm.rmsnorm_bwd_ref(d, x, w, rstd)):
        assert_close(g, r, dt, scale=float(rstd.max()))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", ["ref"] + variants(rmsnorm, "rmsnorm_fwd"))
def test_rmsnorm_kernel_zero_and_large_rows(name, dt):
    x = np.zeros((3, 33), dtype=dt)
    x[1] = 1e4  # squares 1e8: no float32 overflow
    x[2, ::2] = -7.0
    w = np.linspace(0.5, 2, 33).astype(dt)
    out, rstd = rmsnorm.VARIANTS["rmsnorm_fwd"][name](x, w, 1e-6)
    np.testing.assert_array_equal(out[0], 0)  # a zero row: rstd = 1/sqrt(eps), out = 0
    np.testing.assert_allclose(rstd[0], 1e3, rtol=1e-5)
    np.testing.assert_allclose(out[1], w, rtol=1e-5)  # a constant row normalises to 1 * w
    dx, dw = rmsnorm.VARIANTS["rmsnorm_bwd"][name](np.ones_like(x), x, w, rstd)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))


# ---- RoPE kernels ---------------------------------------------------------------------------
def test_rope_tables_known_answer():
    cos, sin = rope.rope_tables(4, np.array([0, 1, 2]), dtype=np.float64)
    inv = np.array([1.0, 0.01])  # 10000^(-0/4), 10000^(-2/4)
    ang = np.array([0, 1, 2])[:, None] * inv
    np.testing.assert_array_equal(cos, np.cos(ang))
    np.testing.assert_array_equal(sin, np.sin(ang))
    c32, s32 = rope.rope_tables(64, np.arange(4096))
    assert c32.dtype == np.float32 and c32.shape == (4096, 32)
    c64, s64 = rope.rope_tables(64, np.arange(4096), dtype=np.float64)
    np.testing.assert_array_equal(c32, c64.astype(np.float32))  # float64 angles, then cast
    with pytest.raises(ValueError, match="even"):
        rope.rope_tables(5, np.arange(3))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("name", variants(rope, "rope_fwd"))
@given(B=st.integers(1, 2), T=st.integers(1, 9), NH=st.integers(1, 4), h=st.integers(1, 16),
       start=st.integers(0, 4096), seed=seeds)
def test_rope_kernel(name, interleaved, dt, B, T, NH, h, start, seed):
    rng = np.random.default_rng(seed)
    hs = 2 * h
    x, d = rand(rng, (B, T, NH, hs), dt, 3), rand(rng, (B, T, NH, hs), dt)
    cos, sin = rope.rope_tables(hs, np.arange(start, start + T), dtype=dt)
    assert_close(rope.VARIANTS["rope_fwd"][name](x, cos, sin, interleaved),
                 rope.rope_fwd_ref(x, cos, sin, interleaved), dt)
    assert_close(rope.VARIANTS["rope_bwd"][name](d, cos, sin, interleaved),
                 rope.rope_bwd_ref(d, cos, sin, interleaved), dt)


@pytest.mark.parametrize("name", ["ref"] + variants(rope, "rope_fwd"))
def test_rope_kernel_reads_a_strided_view(name):
    """q as a slice of a fused (B, T, (NH + 2 NKV) hs) projection: not C-contiguous."""
    rng = np.random.default_rng(0)
    B, T, NH, NKV, hs = 2, 5, 4, 2, 6
    qkv = rng.standard_normal((B, T, (NH + 2 * NKV) * hs))
    q = qkv[..., : NH * hs].reshape(B, T, NH, hs)
    assert not q.flags.c_contiguous
    cos, sin = rope.rope_tables(hs, np.arange(T), dtype=np.float64)
    for inter in (False, True):
        want = rope.rope_fwd_ref(np.ascontiguousarray(q), cos, sin, inter)
        # the cpu kernel may fuse a multiply-add (fastmath "contract"): a few ulp, not equality
        np.testing.assert_allclose(rope.VARIANTS["rope_fwd"][name](q, cos, sin, inter), want,
                                   rtol=1e-14, atol=1e-15)


def _half_to_interleaved(hs):
    """perm with x_interleaved = x_half[..., perm]: half-split pair (i, i + hs/2) -> (2i, 2i+1)."""
    h = hs // 2
    perm = np.empty(hs, dtype=np.int64)
    perm[0::2] = np.arange(h)
    perm[1::2] = np.arange(h) + h
    return perm


@pytest.mark.parametrize("name", ["ref"] + variants(rope, "rope_fwd"))
@given(T=st.integers(1, 9), h=st.integers(1, 8), seed=seeds)
def test_rope_layouts_agree_under_the_channel_permutation(name, T, h, seed):
    """A checkpoint converted between the layouts permutes q and k's channels: the rotated
    vectors are then the same permutation apart, and every score q_t . k_s is the same."""
    rng = np.random.default_rng(seed)
    hs = 2 * h
    q, k = rand(rng, (1, T, 3, hs), np.float64, 3), rand(rng, (1, T, 3, hs), np.float64, 3)
    cos, sin = rope.rope_tables(hs, np.arange(T), dtype=np.float64)
    fwd = rope.VARIANTS["rope_fwd"][name]
    perm = _half_to_interleaved(hs)
    qh, kh = fwd(q, cos, sin, False), fwd(k, cos, sin, False)
    qi, ki = fwd(q[..., perm], cos, sin, True), fwd(k[..., perm], cos, sin, True)
    np.testing.assert_allclose(qi, qh[..., perm], rtol=1e-12, atol=1e-12)
    scores_h = np.einsum("bthd,bshd->bhts", qh, kh)
    scores_i = np.einsum("bthd,bshd->bhts", qi, ki)
    np.testing.assert_allclose(scores_i, scores_h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("name", ["ref"] + variants(rope, "rope_fwd"))
@given(T=st.integers(1, 9), h=st.integers(1, 8), shift=st.integers(0, 1000), seed=seeds)
def test_rope_properties(name, interleaved, T, h, shift, seed):
    rng = np.random.default_rng(seed)
    hs = 2 * h
    fwd, bwd = rope.VARIANTS["rope_fwd"][name], rope.VARIANTS["rope_bwd"][name]
    x = rand(rng, (2, T, 3, hs), np.float64, 3)
    cos, sin = rope.rope_tables(hs, np.arange(T), dtype=np.float64)
    # position 0 is the identity (cos 1, sin 0: exact)
    np.testing.assert_array_equal(fwd(x, cos, sin, interleaved)[:, :1], x[:, :1])
    # a rotation keeps each head vector's norm, and its transpose (the backward) undoes it
    y = fwd(x, cos, sin, interleaved)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(bwd(y, cos, sin, interleaved), x, rtol=1e-12, atol=1e-12)
    # relative positions: shifting every position by the same amount keeps every score
    # (angles up to 1000 rad: the tables' rounding, ~1e-13, bounds the tolerance)
    c2, s2 = rope.rope_tables(hs, np.arange(shift, shift + T), dtype=np.float64)
    s_a = np.einsum("bthd,bshd->bhts", y, fwd(x[::-1], cos, sin, interleaved))
    s_b = np.einsum("bthd,bshd->bhts", fwd(x, c2, s2, interleaved), fwd(x[::-1], c2, s2, interleaved))
    np.testing.assert_allclose(s_b, s_a, rtol=1e-9, atol=1e-9)


def test_rope_kernel_rejects_bad_tables():
    x = np.zeros((1, 3, 2, 4))
    cos, sin = rope.rope_tables(4, np.arange(2), dtype=np.float64)
    for name in ["cpu"]:
        with pytest.raises(ValueError, match="cos, sin of shape"):
            rope.VARIANTS["rope_fwd"][name](x, cos, sin, False)


# ---- SwiGLU kernels -------------------------------------------------------------------------
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", variants(swiglu, "swiglu_fwd"))
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       scale=st.sampled_from([1.0, 3.0, 30.0]), seed=seeds)
def test_swiglu_kernel(name, dt, shape, scale, seed):
    rng = np.random.default_rng(seed)
    a, b, d = rand(rng, shape, dt, scale), rand(rng, shape, dt, 3), rand(rng, shape, dt)
    assert_close(swiglu.VARIANTS["swiglu_fwd"][name](a, b), swiglu.swiglu_fwd_ref(a, b), dt)
    for g, r in zip(swiglu.VARIANTS["swiglu_bwd"][name](d, a, b), swiglu.swiglu_bwd_ref(d, a, b)):
        assert_close(g, r, dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", ["ref"] + variants(swiglu, "swiglu_fwd"))
def test_swiglu_kernel_extremes(name, dt):
    a = np.array([-1000, -100, -88, -30, -1, 0, 1, 30, 88, 100, 1000], dtype=dt)
    b = np.full_like(a, 2.0)
    out = swiglu.VARIANTS["swiglu_fwd"][name](a, b)
    da, db = swiglu.VARIANTS["swiglu_bwd"][name](np.ones_like(a), a, b)
    a64 = a.astype(np.float64)
    sig = np.array([1 / (1 + math.exp(-v)) if v > -700 else 0.0 for v in a64])
    for got, want in ((out, 2 * a64 * sig), (db, a64 * sig), (da, 2 * sig * (1 + a64 * (1 - sig)))):
        assert got.dtype == dt and np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30)


# ---- functional: RMSNorm --------------------------------------------------------------------
away_from_zero = st.floats(0.5, 3, width=64).flatmap(lambda v: st.sampled_from([v, -v]))


def composed_rms_norm(x, w, eps=1e-6):
    return x * ((x * x).mean(axis=-1, keepdims=True) + eps) ** -0.5 * w


@given(n=st.integers(1, 4), c=st.integers(1, 7), data=st.data())
def test_rms_norm(n, c, data):
    x = np.array(data.draw(st.lists(away_from_zero, min_size=2 * n * c, max_size=2 * n * c))).reshape(2, n, c)
    w = np.array(data.draw(st.lists(st.floats(-3, 3, width=64), min_size=c, max_size=c)))
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(F.rms_norm(leaf(x), leaf(w)).numpy(), want, rtol=1e-12, atol=1e-12)
    assert gradcheck(F.rms_norm, [leaf(x), leaf(w)])
    assert_same_as_composed(F.rms_norm, composed_rms_norm, [x, w], rtol=1e-9, atol=1e-10)


def test_rms_norm_float32_and_errors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 17)).astype(np.float32)
    w = rng.standard_normal(17).astype(np.float32)
    xt, wt = tensor(x, requires_grad=True), tensor(w, requires_grad=True)
    y = F.rms_norm(xt, wt, eps=1e-5)
    y.sum().backward()
    assert y.dtype == np.float32 and y.shape == x.shape
    assert xt.grad.dtype == np.float32 and wt.grad.dtype == np.float32
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(y.numpy(), x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"must be \(17,\)"):
        F.rms_norm(xt, tensor(np.ones(16, np.float32)))


# ---- functional: RoPE -----------------------------------------------------------------------
def composed_rope(x, cos, sin, interleaved):
    """out = x * cos' + (x @ R) * sin', R the fixed matrix with (x @ R) = (-x2, x1) per pair."""
    hs = x.shape[-1]
    h = hs // 2
    R = np.zeros((hs, hs))
    i1, i2 = (np.arange(0, hs, 2), np.arange(1, hs, 2)) if interleaved else (np.arange(h), np.arange(h, hs))
    R[i2, i1] = -1.0  # (x @ R)[i1] = -x[i2]
    R[i1, i2] = 1.0   # (x @ R)[i2] = x[i1]
    cf, sf = np.zeros((cos.shape[0], hs)), np.zeros((cos.shape[0], hs))
    cf[:, i1], cf[:, i2], sf[:, i1], sf[:, i2] = cos, cos, sin, sin
    return x * cf[None, :, None, :] + (x @ R) * sf[None, :, None, :]


@pytest.mark.parametrize("interleaved", [False, True])
@given(b=st.integers(1, 2), t=st.integers(1, 5), nh=st.integers(1, 3), h=st.integers(1, 3),
       start=st.integers(0, 100), data=st.data())
def test_rope(interleaved, b, t, nh, h, start, data):
    from hypothesis.extra import numpy as hnp
    x = data.draw(hnp.arrays(np.float64, (b, t, nh, 2 * h), elements=st.floats(-3, 3, width=64)))
    cos, sin = rope.rope_tables(2 * h, np.arange(start, start + t), dtype=np.float64)
    fused = lambda x: F.rope(x, cos, sin, interleaved)  # noqa: E731
    np.testing.assert_allclose(fused(leaf(x)).numpy(), composed_rope(x, cos, sin, interleaved), rtol=1e-12, atol=1e-12)
    assert gradcheck(fused, [leaf(x)])
    assert_same_as_composed(fused, lambda x: composed_rope(x, cos, sin, interleaved), [x])


def test_rope_float32_view_and_errors():
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((2, 4, 3 * 8)).astype(np.float32)
    t = tensor(qkv, requires_grad=True)
    q = t[:, :, :16].reshape(2, 4, 2, 8)  # a slice of a fused projection
    cos, sin = rope.rope_tables(8, np.arange(4), dtype=np.float64)  # cast to x's dtype inside
    y = F.rope(q, cos, sin)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.numpy(), rope.rope_fwd_ref(qkv[:, :, :16].reshape(2, 4, 2, 8), cos.astype(np.float32),
                                                             sin.astype(np.float32), False), rtol=1e-6)
    (y * y).sum().backward()  # |rope(x)|^2 = |x|^2: the gradient is 2 x on q's slice, 0 elsewhere
    np.testing.assert_allclose(t.grad[:, :, :16], 2 * qkv[:, :, :16], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(t.grad[:, :, 16:], 0)
    with pytest.raises(ValueError, match="even hs"):
        F.rope(tensor(np.zeros((1, 4, 2, 7))), cos, sin)
    with pytest.raises(ValueError, match=r"must both be \(3, 4\)"):
        F.rope(tensor(np.zeros((1, 3, 2, 8))), cos, sin)


# ---- functional: SwiGLU ---------------------------------------------------------------------
def composed_swiglu(a, b):
    return a * (1 / (1 + (-a).exp())) * b


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data())
def test_swiglu(shape, data):
    from hypothesis.extra import numpy as hnp
    a = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-30, 30, width=64)))
    b = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-3, 3, width=64)))
    np.testing.assert_allclose(F.swiglu(leaf(a), leaf(b)).numpy(), a / (1 + np.exp(-a)) * b, rtol=1e-12, atol=1e-300)
    assert gradcheck(F.swiglu, [leaf(a), leaf(b)])
    assert_same_as_composed(F.swiglu, composed_swiglu, [a, b])


def test_swiglu_float32_and_errors():
    rng = np.random.default_rng(0)
    a = tensor(rng.standard_normal((3, 11)).astype(np.float32), requires_grad=True)
    b = tensor(rng.standard_normal((3, 11)).astype(np.float32), requires_grad=True)
    y = F.swiglu(a, b)
    y.sum().backward()
    assert y.dtype == a.grad.dtype == b.grad.dtype == np.float32
    with pytest.raises(ValueError, match="one shape and dtype"):
        F.swiglu(a, tensor(np.ones((1, 11), np.float32)))


# ---- grouped-query attention: kernels -------------------------------------------------------
from kernels import attention  # noqa: E402
from kernels.lab import attention as lab_attention  # noqa: E402

ATT_CPU = [n for n in lab_attention.VARIANTS["attention_fwd"] if n != "ref" and not n.startswith("gpu")]


def np_attention(q, k, v):
    """The textbook formula, head by head, with kv head h // G for query head h."""
    B, NH, T, hs = q.shape
    G = NH // k.shape[1]
    out = np.empty_like(q)
    for b in range(B):
        for h in range(NH):
            s = q[b, h] @ k[b, h // G].T / math.sqrt(hs)
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, h] = p / p.sum(-1, keepdims=True) @ v[b, h // G]
    return out


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", ATT_CPU)
@given(B=st.integers(1, 2), NKV=st.integers(1, 3), G=st.integers(1, 3), T=st.integers(1, 70),
       hs=st.integers(1, 9), seed=seeds)
def test_gqa_attention_kernel(name, dt, B, NKV, G, T, hs, seed):
    rng = np.random.default_rng(seed)
    NH = NKV * G
    q, d = rand(rng, (B, NH, T, hs), dt, 3), rand(rng, (B, NH, T, hs), dt)
    k, v = rand(rng, (B, NKV, T, hs), dt, 3), rand(rng, (B, NKV, T, hs), dt)
    want = attention.attention_fwd_ref(q, k, v)
    if dt == np.float64:
        np.testing.assert_allclose(want[0], np_attention(q, k, v), rtol=1e-10, atol=1e-12)
    for g, r in zip(lab_attention.VARIANTS["attention_fwd"][name](q, k, v), want):
        assert_close(g, r, dt)
    got_b = lab_attention.VARIANTS["attention_bwd"][name](d, q, k, v, *want)
    for g, r in zip(got_b, attention.attention_bwd_ref(d, q, k, v, *want)):
        assert_close(g, r, dt)
    assert got_b[1].shape == got_b[2].shape == (B, NKV, T, hs)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", ["ref", "cpu_gemm"])
@given(NKV=st.integers(1, 3), G=st.integers(1, 4), T=st.integers(1, 130), seed=seeds)
def test_gqa_equals_attention_on_repeated_kv(name, dt, NKV, G, T, seed):
    """The same products on the same numbers: out, lse and dq equal bit for bit; dk, dv are the
    sums of the repeated heads' gradients over each group (equal up to summation order)."""
    rng = np.random.default_rng(seed)
    NH, hs = NKV * G, 8
    q, d = rand(rng, (2, NH, T, hs), dt, 3), rand(rng, (2, NH, T, hs), dt)
    k, v = rand(rng, (2, NKV, T, hs), dt, 3), rand(rng, (2, NKV, T, hs), dt)
    fwd, bwd = lab_attention.VARIANTS["attention_fwd"][name], lab_attention.VARIANTS["attention_bwd"][name]
    kr, vr = attention.repeat_kv(k, G), attention.repeat_kv(v, G)
    out, lse = fwd(q, k, v)
    out_r, lse_r = fwd(q, kr, vr)
    np.testing.assert_array_equal(out, out_r)
    np.testing.assert_array_equal(lse, lse_r)
    dq, dk, dv = bwd(d, q, k, v, out, lse)
    dq_r, dk_r, dv_r = bwd(d, q, kr, vr, out, lse)
    np.testing.assert_array_equal(dq, dq_r)
    assert_close(dk, attention.sum_groups(dk_r, G), dt)
    assert_close(dv, attention.sum_groups(dv_r, G), dt)


@pytest.mark.parametrize("name", ATT_CPU)
def test_gqa_attention_kernel_reads_a_fused_projection(name):
    """q, k, v as strided views of one (B, T, (NH + 2 NKV) hs) projection, as a Llama layer
    with a fused qkv weight passes them."""
    rng = np.random.default_rng(0)
    B, T, NH, NKV, hs = 2, 67, 6, 2, 8
    qkv = rng.standard_normal((B, T, NH + 2 * NKV, hs)).astype(np.float32)
    q, k, v = (qkv[:, :, a:z].transpose(0, 2, 1, 3) for a, z in ((0, NH), (NH, NH + NKV), (NH + NKV, NH + 2 * NKV)))
    d = rng.standard_normal((B, NH, T, hs)).astype(np.float32)
    c = [np.ascontiguousarray(x) for x in (q, k, v)]
    want = attention.attention_fwd_ref(*c)
    got = lab_attention.VARIANTS["attention_fwd"][name](q, k, v)
    for g, r in zip(got, want):
        assert_close(g, r, np.float32)
    for g, r in zip(lab_attention.VARIANTS["attention_bwd"][name](d, q, k, v, *got),
                    attention.attention_bwd_ref(d, *c, *want)):
        assert_close(g, r, np.float32)


@pytest.mark.parametrize("name", ["ref"] + ATT_CPU)
def test_gqa_attention_kernel_rejects_bad_shapes(name):
    q = np.zeros((1, 6, 5, 4))
    for k in (np.zeros((1, 4, 5, 4)), np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 5, 3))):
        with pytest.raises(ValueError, match="NKV dividing NH"):
            lab_attention.VARIANTS["attention_fwd"][name](q, k, k)


GPU_GQA = r"""
import numpy as np
from kernels import attention
rng = np.random.default_rng(0)
for NH, NKV, T in ((2, 2, 70), (3, 1, 45), (4, 2, 3)):
    for dt, tol in ((np.float32, 2e-5), (np.float64, 1e-12)):
        q, d = (rng.standard_normal((2, NH, T, 5)).astype(dt) for _ in range(2))
        k, v = (rng.standard_normal((2, NKV, T, 5)).astype(dt) for _ in range(2))
        want = attention.attention_fwd_ref(q, k, v)
        got = attention.attention_fwd_gpu(q, k, v)
        got_b = attention.attention_bwd_gpu(d, q, k, v, *want)
        for g, r in zip(got + got_b, want + attention.attention_bwd_ref(d, q, k, v, *want)):
            assert g.shape == r.shape and g.dtype == r.dtype, (g.shape, r.shape)
            assert np.max(np.abs(g - r) / (1 + np.abs(r))) <= tol, (NH, NKV, dt)

# the functional ops driving the GPU kernels (TINYLM_KERNELS is read at each call)
import os
from tinylm import F, tensor
from kernels.rope import rope_tables
x, d = rng.standard_normal((2, 3, 4, 6)), rng.standard_normal((2, 3, 4, 6))
w = rng.standard_normal(6)
cos, sin = rope_tables(6, np.arange(5, 8), dtype=np.float64)
ops = [(lambda t: F.rms_norm(t[0], t[1]), [x, w]),
       (lambda t: F.rope(t[0], cos, sin, True), [x]),
       (lambda t: F.swiglu(t[0], t[1]), [3 * x, d]),
       (lambda t: F.causal_self_attention(t[0], t[1], t[2]),
        [x.transpose(0, 2, 1, 3)[:, :4], x.transpose(0, 2, 1, 3)[:, :2], d.transpose(0, 2, 1, 3)[:, :2]])]
for fn, arrays in ops:
    res = {}
    for backend in ("ref", "gpu"):
        os.environ["TINYLM_KERNELS"] = backend
        ts = [tensor(a.copy(), requires_grad=True) for a in arrays]
        y = fn(ts)
        y.backward(np.ones(y.shape))
        res[backend] = [y.numpy()] + [t.grad for t in ts]
    for g, r in zip(res["gpu"], res["ref"]):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)
print("ok")
"""


def test_gqa_attention_gpu_under_simulator():
    """G = 1, 3 and 2 (tests/test_kernels_gpu.py runs the G = 2 case of kernels/_gpucheck.py),
    and rms_norm, rope, swiglu and GQA attention through tinylm.functional on the GPU kernels."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-c", GPU_GQA], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr[-3000:]


# ---- grouped-query attention: functional ----------------------------------------------------
def composed_gqa(q, k, v):
    """Standard attention on k, v repeated per group (a gather: its backward sums the group)."""
    NH, NKV = q.shape[1], k.shape[1]
    idx = np.arange(NH) // (NH // NKV)
    T, hs = q.shape[2], q.shape[3]
    kr, vr = k[:, idx], v[:, idx]
    mask = np.where(np.tril(np.ones((T, T))), 0.0, -np.inf)
    s = q @ kr.transpose(0, 1, 3, 2) * (1 / math.sqrt(hs)) + mask
    e = (s - s.max(axis=-1, keepdims=True)).exp()
    return e / e.sum(axis=-1, keepdims=True) @ vr


@given(b=st.integers(1, 2), nkv=st.integers(1, 2), g=st.integers(1, 3), t=st.integers(1, 5),
       hs=st.integers(1, 4), data=st.data())
def test_gqa_causal_self_attention(b, nkv, g, t, hs, data):
    from hypothesis.extra import numpy as hnp
    el = st.floats(-3, 3, width=64)
    q = data.draw(hnp.arrays(np.float64, (b, nkv * g, t, hs), elements=el))
    k, v = (data.draw(hnp.arrays(np.float64, (b, nkv, t, hs), elements=el)) for _ in range(2))
    np.testing.assert_allclose(F.causal_self_attention(leaf(q), leaf(k), leaf(v)).numpy(), np_attention(q, k, v),
                               rtol=1e-9, atol=1e-12)
    assert gradcheck(F.causal_self_attention, [leaf(q), leaf(k), leaf(v)])
    assert_same_as_composed(F.causal_self_attention, composed_gqa, [q, k, v])


def test_gqa_with_nkv_equal_nh_is_standard_attention():
    """NKV = NH through causal_self_attention gives exactly what the fused-projection op (the
    GPT path, written before GQA) gives on the same numbers, gradients included."""
    rng = np.random.default_rng(0)
    B, T, NH, hs = 2, 7, 3, 4
    qkv = rng.standard_normal((B, T, 3 * NH * hs))
    dout = rng.standard_normal((B, T, NH * hs))
    a = tensor(qkv, requires_grad=True)
    F.attention_qkv(a, NH).backward(dout)
    heads = qkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)
    q, k, v = (tensor(np.ascontiguousarray(h), requires_grad=True) for h in heads)
    y = F.causal_self_attention(q, k, v)
    y.backward(dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3))
    np.testing.assert_allclose(y.numpy().transpose(0, 2, 1, 3).reshape(B, T, NH * hs),
                               F.attention_qkv(tensor(qkv), NH).numpy(), rtol=1e-14, atol=1e-15)
    g = a.grad.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)
    for i, t in enumerate((q, k, v)):
        np.testing.assert_allclose(t.grad, g[i], rtol=1e-13, atol=1e-14)


def test_gqa_causal_self_attention_float32_and_errors():
    rng = np.random.default_rng(0)
    q = tensor(rng.standard_normal((2, 4, 9, 8)).astype(np.float32), requires_grad=True)
    k = tensor(rng.standard_normal((2, 2, 9, 8)).astype(np.float32), requires_grad=True)
    v = tensor(rng.standard_normal((2, 2, 9, 8)).astype(np.float32), requires_grad=True)
    y = F.causal_self_attention(q, k, v)
    (y * y).sum().backward()
    assert y.shape == q.shape and k.grad.shape == k.shape and v.grad.dtype == np.float32
    for kk in (np.zeros((2, 3, 9, 8)), np.zeros((2, 2, 8, 8)), np.zeros((2, 2, 9, 7))):
        with pytest.raises(ValueError, match="NKV dividing NH"):
            F.causal_self_attention(q, tensor(kk.astype(np.float32)), tensor(kk.astype(np.float32)))
