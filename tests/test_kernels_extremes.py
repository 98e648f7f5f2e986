"""Kernels at the edges of their domain, with poisoned outputs, and the references themselves.

- Extremes named in the spec: logits at +-1000, ignore_index rows, duplicate ids, T=1, C=1.
- Poisoned outputs: each parallel Numba kernel is called directly on NaN-filled output buffers;
  an element a prange loop skipped would stay NaN (docs/performance.md, "Pitfalls: a parallel
  loop that silently did nothing").
- The backward references against central finite differences of the forward references in
  float64 (the variants are compared with the references; this checks the references).
"""
import math

import numpy as np
import pytest

from kernels import adamw, attention, cross_entropy, embedding, gelu, gradnorm, layernorm
from kernels.lab import attention as lab_attention
from kernels.lab import matmul as lab_matmul

CPU_CE = [n for n in cross_entropy.VARIANTS["cross_entropy_fwd"] if not n.startswith("gpu")]
CPU_ATT = [n for n in lab_attention.VARIANTS["attention_fwd"] if not n.startswith("gpu")]


def nan_like(a, shape=None, dtype=None):
    return np.full(a.shape if shape is None else shape, np.nan, dtype=dtype or a.dtype)


# ---- extremes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CPU_CE)
@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_cross_entropy_logits_pm1000(name, dt):
    V = 37
    z = np.full((4, V), -1000.0, dtype=dt)
    z[0, 3] = 1000.0     # target holds all the mass: loss 0
    z[1, 3] = 1000.0     # target elsewhere: loss 2000
    z[2, :] = 1000.0     # uniform at +1000: loss log V
    t = np.array([3, 5, 0, -100])  # row 3 ignored
    loss, lse = cross_entropy.VARIANTS["cross_entropy_fwd"][name](z, t, -100)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(lse))
    np.testing.assert_allclose(loss, [0.0, 2000.0, math.log(V), 0.0], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(lse[:3], [1000.0, 1000.0, 1000.0 + math.log(V)], rtol=1e-6)
    dl = np.ones(4, dtype=dt)
    d = cross_entropy.VARIANTS["cross_entropy_bwd"][name](z, t, lse, dl, -100)
    assert np.all(np.isfinite(d))
    assert d[0, 3] == pytest.approx(0.0, abs=1e-6)      # softmax 1 minus one-hot 1
    assert d[1, 5] == pytest.approx(-1.0, abs=1e-6)     # softmax ~0 minus 1
    assert d[1, 3] == pytest.approx(1.0, abs=1e-6)      # all the probability, not the target
    np.testing.assert_allclose(d[2], np.full(V, 1.0 / V) - np.eye(V)[0], atol=1e-6)
    assert np.all(d[3] == 0.0)                           # ignored row: exactly zero
    # rows sum to 0 up to float32 rounding of lse ~ 1000 (its ulp is 6.1e-5)
    assert d.sum(axis=1) == pytest.approx(0.0, abs=2e-4)


@pytest.mark.parametrize("name", CPU_CE)
def test_cross_entropy_all_rows_ignored(name):
    z = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    t = np.full(3, 7, dtype=np.int64)  # a valid id used as the ignore index
    loss, lse = cross_entropy.VARIANTS["cross_entropy_fwd"][name](z, t, 7)
    assert np.all(loss == 0.0)
    d = cross_entropy.VARIANTS["cross_entropy_bwd"][name](z, t, lse, np.ones(3, np.float32), 7)
    assert np.all(d == 0.0)


@pytest.mark.parametrize("name", CPU_ATT)
def test_attention_T1_is_v(name):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 3, 1, 8)) for _ in range(3))
    out, lse = lab_attention.VARIANTS["attention_fwd"][name](q, k, v)
    np.testing.assert_allclose(out, v, rtol=1e-14)  # one key: softmax weight exactly 1
    np.testing.assert_allclose(lse[..., 0], (q * k).sum(-1)[..., 0] / math.sqrt(8), rtol=1e-12)


@pytest.mark.parametrize("name", CPU_ATT)
def test_attention_large_scores_finite(name):
    """Scores of +-several hundred: the online max/rescale must not overflow or NaN."""
    rng = np.random.default_rng(2)
    q, k, v, d = (rng.standard_normal((1, 2, 70, 16)).astype(np.float32) for _ in range(4))
    q *= 60.0
    want = attention.attention_fwd_ref(q, k, v)
    got = lab_attention.VARIANTS["attention_fwd"][name](q, k, v)
    for g, r in zip(got, want):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-3 * np.abs(r).max())
    for g, r in zip(lab_attention.VARIANTS["attention_bwd"][name](d, q, k, v, *want),
                    attention.attention_bwd_ref(d, q, k, v, *want)):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-3 * max(1.0, np.abs(r).max()))


def test_attention_flash_default_tiles_long_T():
    """T=150 > the 64-row/64-key tiles: several full tiles plus a partial one."""
    rng = np.random.default_rng(3)
    q, k, v, d = (rng.standard_normal((1, 2, 150, 32)).astype(np.float32) for _ in range(4))
    want = attention.attention_fwd_ref(q, k, v)
    for g, r in zip(lab_attention.attention_fwd_cpu_flash(q, k, v), want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-5)
    for g, r in zip(lab_attention.attention_bwd_cpu_flash(d, q, k, v, *want),
                    attention.attention_bwd_ref(d, q, k, v, *want)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=5e-5)


def test_embedding_all_duplicates():
    ids = np.full((4, 5), 2, dtype=np.int64)
    d = np.random.default_rng(4).standard_normal((4, 5, 6))
    dw = embedding.embedding_bwd_cpu(d, ids, 3)
    np.testing.assert_allclose(dw[2], d.reshape(-1, 6).sum(0), rtol=1e-13)
    assert np.all(dw[[0, 1]] == 0.0)


def test_gelu_tails():
    x = np.array([-30.0, -10.0, 0.0, 10.0, 30.0], dtype=np.float32)
    np.testing.assert_allclose(gelu.gelu_fwd_cpu(x), [0.0, 0.0, 0.0, 10.0, 30.0], atol=1e-6)
    np.testing.assert_allclose(gelu.gelu_bwd_cpu(np.ones_like(x), x), [0, 0, 0.5, 1, 1], atol=1e-6)


def test_layernorm_constant_row():
    x = np.full((2, 5), 3.0)
    out, mean, rstd = layernorm.layernorm_fwd_cpu(x, np.ones(5), np.full(5, 0.5), 1e-5)
    np.testing.assert_allclose(out, 0.5)
    np.testing.assert_allclose(rstd, 1 / math.sqrt(1e-5))


def test_adamw_step1_known_answer():
    """At step 1 with m = v = 0, AdamW moves each weight by lr * sign(g) (|g| >> eps)."""
    p = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    g = np.array([0.3, -0.01, 2.0], dtype=np.float32)
    for fn in adamw.VARIANTS["adamw_update"].values():
        if fn.__name__.endswith("gpu"):
            continue
        pp, m, v = p.copy(), np.zeros(3, np.float32), np.zeros(3, np.float32)
        fn(pp, g, m, v, 0.1, 0.9, 0.999, 1e-8, 0.01, 1)
        np.testing.assert_allclose(pp, p * (1 - 0.1 * 0.01) - 0.1 * np.sign(g), rtol=1e-6)
        np.testing.assert_allclose(m, 0.1 * g, rtol=1e-6)
        np.testing.assert_allclose(v, 0.001 * g * g, rtol=1e-6)


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(257).astype(np.float32)
    grads = [rng.standard_normal(257).astype(np.float32) for _ in range(5)]
    tp = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.AdamW([tp], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for step, g in enumerate(grads, start=1):
        tp.grad = torch.tensor(g)
        opt.step()
        adamw.adamw_update_cpu(p, g, m, v, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


# ---- poisoned outputs: every parallel kernel writes every element -----------------------------

def test_poisoned_layernorm():
    rng = np.random.default_rng(6)
    x, w, b, d = rng.standard_normal((37, 19)), rng.standard_normal(19), rng.standard_normal(19), rng.standard_normal((37, 19))
    out, mean, rstd = nan_like(x), nan_like(x, (37,)), nan_like(x, (37,))
    layernorm._ln_fwd_cpu(x, w, b, 1e-5, out, mean, rstd)
    for g, r in zip((out, mean, rstd), layernorm.layernorm_fwd_ref(x, w, b, 1e-5)):
        # relative to each array's scale: an output near 0 (x w + b cancelling) carries the
        # rounding of the terms, not of itself (seen: 4.8e-16 off at 2.2e-4, 2e-12 relative)
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-14 * float(np.abs(r).max()))
    dx, dwp, dbp = nan_like(x), nan_like(x, (16, 19)), nan_like(x, (16, 19))
    layernorm._ln_bwd_cpu(d, x, w, mean, rstd, dx, dwp, dbp)
    for g, r in zip((dx, dwp.sum(0), dbp.sum(0)), layernorm.layernorm_bwd_ref(d, x, w, mean, rstd)):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


def test_poisoned_gelu():
    x = np.random.default_rng(7).standard_normal(1001).astype(np.float32)
    out, dx = nan_like(x), nan_like(x)
    gelu._gelu_fwd_cpu(x, out, np.float32(gelu.GELU_S), np.float32(gelu.GELU_K))
    gelu._gelu_bwd_cpu(x, x, dx, np.float32(gelu.GELU_S), np.float32(gelu.GELU_K))
    np.testing.assert_allclose(out, gelu.gelu_fwd_ref(x), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dx, gelu.gelu_bwd_ref(x, x), rtol=1e-4, atol=1e-6)


def test_poisoned_cross_entropy():
    rng = np.random.default_rng(8)
    z = rng.standard_normal((33, 50))
    t = rng.integers(0, 50, 33)
    t[::4] = -100
    loss, lse = nan_like(z, (33,)), nan_like(z, (33,))
    cross_entropy._ce_fwd_cpu(z, t, -100, loss, lse)
    want = cross_entropy.cross_entropy_fwd_ref(z, t, -100)
    np.testing.assert_allclose(loss, want[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want[1], rtol=1e-12)
    d = nan_like(z)
    cross_entropy._ce_bwd_cpu(z, t, lse, np.ones(33), -100, d)
    np.testing.assert_allclose(d, cross_entropy.cross_entropy_bwd_ref(z, t, lse, np.ones(33), -100), atol=1e-14)


def test_poisoned_attention():
    rng = np.random.default_rng(9)
    q, k, v, d = (rng.standard_normal((3, 21, 5)) for _ in range(4))  # (B*NH, T, hs)
    kT, vT = np.ascontiguousarray(k.transpose(0, 2, 1)), np.ascontiguousarray(v.transpose(0, 2, 1))
    want = attention.attention_fwd_ref(q[None], k[None], v[None])
    want_b = attention.attention_bwd_ref(d[None], q[None], k[None], v[None], *want)
    scale = 1 / math.sqrt(5)
    for fwd in ("plain", "flash"):
        out, lse = nan_like(q), nan_like(q, (3, 21))
        if fwd == "plain":
            lab_attention._attn_fwd_plain(q, kT, v, scale, out, lse)
        else:
            lab_attention._attn_fwd_flash(q, kT, v, scale, out, lse, 4, 3)
        np.testing.assert_allclose(out, want[0][0], rtol=1e-12)
        np.testing.assert_allclose(lse, want[1][0], rtol=1e-12)
        grads = [nan_like(q) for _ in range(3)]
        args = (d, q, k, kT, v, vT, out, lse, scale, *grads)
        if fwd == "plain":
            lab_attention._attn_bwd_plain(*args)
        else:
            lab_attention._attn_bwd_flash(*args, 3)
        for g, r in zip(grads, want_b):
            np.testing.assert_allclose(g, r[0], rtol=1e-10, atol=1e-12)


def test_poisoned_embedding():
    rng = np.random.default_rng(10)
    ids = rng.integers(0, 7, 40)
    w, d = rng.standard_normal((7, 9)), rng.standard_normal((40, 9))
    out = nan_like(w, (40, 9))
    embedding._emb_fwd_cpu(ids, w, out)
    np.testing.assert_array_equal(out, w[ids])
    dw = nan_like(w, (12, 9))  # V=12 > max id: rows nobody writes to must still become 0
    embedding._emb_bwd_cpu(d, ids, dw)
    np.testing.assert_allclose(dw, embedding.embedding_bwd_ref(d, ids, 12), rtol=1e-13)


def test_poisoned_sumsq_parts_and_matmul():
    x = np.random.default_rng(11).standard_normal(1000)
    parts = np.full(64, np.nan)
    gradnorm._sumsq_cpu(x, parts)
    assert np.all(np.isfinite(parts)) and parts.sum() == pytest.approx(np.dot(x, x), rel=1e-13)
    a, b = np.random.default_rng(12).standard_normal((45, 13)), np.random.default_rng(13).standard_normal((13, 70))
    c = np.full((45, 70), np.nan)
    lab_matmul._matmul_cpu_numba(a, b, c, 8, 5, 16)  # blocks that do not divide the sizes
    np.testing.assert_allclose(c, a @ b, rtol=1e-12, atol=1e-12)


# ---- the references against finite differences (float64) -------------------------------------

def numgrad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def test_ref_layernorm_bwd_is_gradient():
    rng = np.random.default_rng(14)
    x, w, b, R = rng.standard_normal((3, 5)), rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal((3, 5))
    L = lambda: float((layernorm.layernorm_fwd_ref(x, w, b, 1e-5)[0] * R).sum())  # noqa: E731
    _, mean, rstd = layernorm.layernorm_fwd_ref(x, w, b, 1e-5)
    dx, dw, db = layernorm.layernorm_bwd_ref(R, x, w, mean, rstd)
    for got, var in ((dx, x), (dw, w), (db, b)):
        np.testing.assert_allclose(got, numgrad(L, var), rtol=1e-6, atol=1e-8)


def test_ref_gelu_bwd_is_gradient():
    x = np.linspace(-6, 6, 25)
    np.testing.assert_allclose(gelu.gelu_bwd_ref(np.ones_like(x), x),
                               numgrad(lambda: float(gelu.gelu_fwd_ref(x).sum()), x), rtol=1e-7, atol=1e-8)


def test_ref_cross_entropy_bwd_is_gradient():
    rng = np.random.default_rng(15)
    z, dl = 3 * rng.standard_normal((4, 6)), rng.standard_normal(4)
    t = np.array([1, -100, 5, 0])
    L = lambda: float((cross_entropy.cross_entropy_fwd_ref(z, t, -100)[0] * dl).sum())  # noqa: E731
    lse = cross_entropy.cross_entropy_fwd_ref(z, t, -100)[1]
    np.testing.assert_allclose(cross_entropy.cross_entropy_bwd_ref(z, t, lse, dl, -100), numgrad(L, z),
                               rtol=1e-6, atol=1e-9)


def test_ref_attention_bwd_is_gradient():
    rng = np.random.default_rng(16)
    q, k, v, R = (rng.standard_normal((1, 2, 4, 3)) for _ in range(4))
    L = lambda: float((attention.attention_fwd_ref(q, k, v)[0] * R).sum())  # noqa: E731
    out, lse = attention.attention_fwd_ref(q, k, v)
    for got, var in zip(attention.attention_bwd_ref(R, q, k, v, out, lse), (q, k, v)):
        np.testing.assert_allclose(got, numgrad(L, var), rtol=1e-6, atol=1e-9)


def test_ref_attention_lse_and_mask():
    rng = np.random.default_rng(17)
    q, k, v = (rng.standard_normal((1, 1, 6, 4)) for _ in range(3))
    out, lse = attention.attention_fwd_ref(q, k, v)
    for t in range(6):  # the direct formula, one query at a time, keys 0..t only
        s = (k[0, 0, : t + 1] @ q[0, 0, t]) / 2.0
        p = np.exp(s - s.max())
        np.testing.assert_allclose(out[0, 0, t], (p / p.sum()) @ v[0, 0, : t + 1], rtol=1e-12)
        assert lse[0, 0, t] == pytest.approx(s.max() + np.log(p.sum()), rel=1e-12)


def test_ref_embedding_bwd_is_gradient():
    rng = np.random.default_rng(18)
    ids, w, R = np.array([[0, 2, 2], [1, 2, 0]]), rng.standard_normal((4, 3)), rng.standard_normal((2, 3, 3))
    L = lambda: float((embedding.embedding_fwd_ref(ids, w) * R).sum())  # noqa: E731
    np.testing.assert_allclose(embedding.embedding_bwd_ref(R, ids, 4), numgrad(L, w), rtol=1e-7, atol=1e-9)


def test_poisoned_attention_blas_tiles():
    rng = np.random.default_rng(19)
    S = rng.standard_normal((2, 3, 7))  # query rows 4..6 of T=7, all 7 keys
    lse = nan_like(S, (2, 7))
    P = S.copy()
    lab_attention._softmax_tile(P, 4, 0.5, lse)
    for r in range(3):
        n = 4 + r + 1
        s = 0.5 * S[:, r, :n]
        e = np.exp(s - s.max(-1, keepdims=True))
        np.testing.assert_allclose(P[:, r, :n], e / e.sum(-1, keepdims=True), rtol=1e-13)
        assert np.all(P[:, r, n:] == 0.0)
        np.testing.assert_allclose(lse[:, 4 + r], s.max(-1) + np.log(e.sum(-1)), rtol=1e-13)
    assert np.all(np.isnan(lse[:, :4]))  # rows outside the tile are not touched
    a, b, D = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 3)), nan_like(S, (2, 5))
    lab_attention._rowdot(a, b, D)
    np.testing.assert_allclose(D, (a * b).sum(-1), rtol=1e-13)
