"""The fused LLM ops: forward against NumPy references written here, gradients against finite
differences (float64) and against the same op composed from primitives, and their properties.

Domain for property tests: sides 1-5 (odd sizes included, T=1 included), values in [-3, 3];
extremes (logits at +-1000) tested explicitly.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinylm import F, Tensor, gradcheck, tensor

vals = st.floats(-3, 3, allow_nan=False, width=64)
side = st.integers(1, 5)


def arr(shape, elements=vals):
    return hnp.arrays(np.float64, shape, elements=elements)


def leaf(a):
    return tensor(np.array(a, dtype=np.float64), requires_grad=True)


def grads_of(fn, arrays):
    ts = [leaf(a) for a in arrays]
    out = fn(*ts)
    out.backward(np.random.default_rng(1).standard_normal(out.shape))
    return out.numpy(), [t.grad for t in ts]


def assert_same_as_composed(fused, composed, arrays, rtol=1e-9, atol=1e-11):
    out_f, g_f = grads_of(fused, arrays)
    out_c, g_c = grads_of(composed, arrays)
    np.testing.assert_allclose(out_f, out_c, rtol=rtol, atol=atol)
    for gf, gc in zip(g_f, g_c):
        np.testing.assert_allclose(gf, gc, rtol=rtol, atol=atol)


# ---- NumPy references -----------------------------------------------------------------------
def np_layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def np_attention(q, k, v):
    T = q.shape[2]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    return np_softmax(s) @ v


# ---- composed from primitives ---------------------------------------------------------------
def composed_layer_norm(x, w, b, eps=1e-5):
    xc = x - x.mean(axis=-1, keepdims=True)
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc * (var + eps) ** -0.5 * w + b


def composed_gelu(x):
    return 0.5 * x * (1 + ((x + 0.044715 * x**3) * math.sqrt(2 / math.pi)).tanh())


def composed_softmax(x, axis=-1):
    e = (x - x.max(axis=axis, keepdims=True)).exp()
    return e / e.sum(axis=axis, keepdims=True)


def composed_log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - (x - m).exp().sum(axis=axis, keepdims=True).log()


def composed_cross_entropy(logits, t, ignore_index=-100):
    keep = np.nonzero(t != ignore_index)[0]
    picked = composed_log_softmax(logits)[keep, t[keep]]
    return -picked.sum() * (1.0 / max(len(keep), 1))


def composed_attention(q, k, v):
    T, hs = q.shape[2], q.shape[3]
    mask = np.where(np.tril(np.ones((T, T))), 0.0, -np.inf)
    return composed_softmax(q @ k.transpose(0, 1, 3, 2) * (1 / math.sqrt(hs)) + mask) @ v


# ---- linear ---------------------------------------------------------------------------------
@given(n=side, cin=side, cout=side, bias=st.booleans(), data=st.data())
def test_linear(n, cin, cout, bias, data):
    x, w, b = data.draw(arr((2, n, cin))), data.draw(arr((cin, cout))), data.draw(arr((cout,)))
    args = [x, w, b] if bias else [x, w]
    fused = lambda x, w, b=None: F.linear(x, w, b)  # noqa: E731
    np.testing.assert_allclose(fused(*map(leaf, args)).numpy(), x @ w + (b if bias else 0), rtol=1e-12)
    assert gradcheck(fused, [leaf(a) for a in args])
    assert_same_as_composed(fused, (lambda x, w, b: x @ w + b) if bias else (lambda x, w: x @ w), args)


@given(n=side, cin=side, cout=side, bias=st.booleans(), data=st.data())
def test_linear_t(n, cin, cout, bias, data):
    x, w, b = data.draw(arr((2, n, cin))), data.draw(arr((cout, cin))), data.draw(arr((cout,)))
    args = [x, w, b] if bias else [x, w]
    fused = lambda x, w, b=None: F.linear_t(x, w, b)  # noqa: E731
    np.testing.assert_allclose(fused(*map(leaf, args)).numpy(), x @ w.T + (b if bias else 0), rtol=1e-12)
    assert gradcheck(fused, [leaf(a) for a in args])
    assert_same_as_composed(fused, (lambda x, w, b: x @ w.T + b) if bias else (lambda x, w: x @ w.T), args)


@pytest.mark.parametrize("wt", [False, True])
@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_linear_weight_gradient_into_existing_grad(wt, dt, monkeypatch):
    """With .grad already allocated (an optimizer's buffer), Linear adds the weight gradient into
    it (matmul_acc): the same numbers as the path that returns a fresh gradient, accumulated
    across backward calls, and the very same array object afterwards."""
    import kernels
    from kernels import registry
    kernels.get("matmul_acc", np.zeros(1))
    calls = []
    real = registry._REGISTRY[("matmul_acc", "cpu")]
    monkeypatch.setitem(registry._REGISTRY, ("matmul_acc", "cpu"),
                        lambda a, b, c: calls.append(c.shape) or real(a, b, c))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7)).astype(dt)
    w = rng.standard_normal((4, 7) if wt else (7, 4)).astype(dt)
    d = rng.standard_normal((3, 5, 4)).astype(dt)
    lin = F.linear_t if wt else F.linear

    def grads(prealloc):
        wt_ = tensor(w, requires_grad=True)
        xt = tensor(x, requires_grad=True)
        if prealloc:
            wt_.grad = np.full(w.shape, 0.5, dtype=dt)
        buf = wt_.grad
        for _ in range(2):
            lin(xt, wt_).backward(d)
        return wt_.grad, buf, xt.grad

    g_fresh, _, dx_fresh = grads(False)
    assert calls == [w.shape]  # the second backward found the first one's .grad
    g_sink, buf, dx_sink = grads(True)
    assert calls == [w.shape] * 3
    assert g_sink is buf
    tol = 1e-5 if dt == np.float32 else 1e-12
    np.testing.assert_allclose(g_sink, g_fresh + 0.5, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx_sink, dx_fresh, rtol=tol, atol=tol)
    want = 2 * ((d.reshape(-1, 4).T @ x.reshape(-1, 7)) if wt else (x.reshape(-1, 7).T @ d.reshape(-1, 4)))
    np.testing.assert_allclose(g_fresh, want, rtol=tol * 10, atol=tol * 10)


def test_linear_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"need w of shape \(3, C_out\)"):
        F.linear(tensor(np.ones((2, 3))), tensor(np.ones((4, 5))))
    with pytest.raises(ValueError, match="bias"):
        F.linear(tensor(np.ones((2, 3))), tensor(np.ones((3, 5))), tensor(np.ones(4)))
    with pytest.raises(ValueError, match=r"need w of shape \(C_out, 3\)"):
        F.linear_t(tensor(np.ones((2, 3))), tensor(np.ones((3, 5))))
    with pytest.raises(ValueError, match="bias"):
        F.linear_t(tensor(np.ones((2, 3))), tensor(np.ones((5, 3))), tensor(np.ones(4)))


# ---- layer norm -----------------------------------------------------------------------------
@given(n=side, c=st.integers(2, 7), data=st.data())
def test_layer_norm(n, c, data):
    x = data.draw(arr((n, c)))
    x = x + np.linspace(0, 1, c)  # rows with some spread: var near 0 makes 1/sqrt(var+eps) stiff
    w, b = data.draw(arr((c,))), data.draw(arr((c,)))
    np.testing.assert_allclose(F.layer_norm(leaf(x), leaf(w), leaf(b)).numpy(), np_layer_norm(x, w, b), rtol=1e-9, atol=1e-10)
    assert gradcheck(F.layer_norm, [leaf(x), leaf(w), leaf(b)], atol=1e-5, rtol=1e-3)
    assert_same_as_composed(F.layer_norm, composed_layer_norm, [x, w, b], rtol=1e-7, atol=1e-8)


@given(x=arr((3, 2, 9)))
def test_layer_norm_standardises(x):
    x = x + np.arange(9)  # never a constant row
    y = F.layer_norm(tensor(x), tensor(np.ones(9)), tensor(np.zeros(9)), eps=0.0).numpy()
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-9)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-7)


def test_layer_norm_float32_and_3d():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 17)).astype(np.float32)
    w, b = rng.standard_normal(17).astype(np.float32), rng.standard_normal(17).astype(np.float32)
    y = F.layer_norm(tensor(x), tensor(w), tensor(b))
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y.numpy(), np_layer_norm(x.astype(np.float64), w, b), rtol=1e-4, atol=1e-5)


# ---- GELU -----------------------------------------------------------------------------------
@given(x=arr(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5)))
def test_gelu(x):
    np.testing.assert_allclose(F.gelu(leaf(x)).numpy(), np_gelu(x), rtol=1e-7, atol=1e-9)
    assert gradcheck(F.gelu, [leaf(x)])
    assert_same_as_composed(F.gelu, composed_gelu, [x], rtol=1e-7, atol=1e-9)


def test_gelu_extremes_float32():
    x = np.array([-1000, -20, -5, 0, 5, 20, 1000], dtype=np.float32)
    y, g = grads_of(F.gelu, [x.astype(np.float64)])
    y32 = F.gelu(tensor(x)).numpy()
    assert np.all(np.isfinite(y32)) and np.all(np.isfinite(g[0]))
    np.testing.assert_allclose(y32, np_gelu(x.astype(np.float64)), atol=1e-5)


# ---- softmax, log_softmax -------------------------------------------------------------------
@pytest.mark.parametrize("fn,ref,composed", [
    (F.softmax, np_softmax, composed_softmax),
    (F.log_softmax, lambda x, axis=-1: np.log(np_softmax(x, axis)), composed_log_softmax),
])
@given(data=st.data())
def test_softmax_family(fn, ref, composed, data):
    x = data.draw(arr(data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))))
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    np.testing.assert_allclose(fn(leaf(x), axis=axis).numpy(), ref(x, axis), rtol=1e-9, atol=1e-12)
    assert gradcheck(lambda t: fn(t, axis=axis), [leaf(x)])
    assert_same_as_composed(lambda t: fn(t, axis=axis), lambda t: composed(t, axis=axis), [x])


@given(x=arr((4, 6)), c=st.floats(-50, 50))
def test_softmax_rows_sum_to_one_and_ignore_a_shift(x, c):
    y = F.softmax(tensor(x)).numpy()
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(F.softmax(tensor(x + c)).numpy(), y, rtol=1e-9, atol=1e-15)


# ---- cross-entropy --------------------------------------------------------------------------
@given(n=side, v=st.integers(2, 7), data=st.data())
def test_cross_entropy(n, v, data):
    logits = data.draw(arr((n, v)))
    t = np.array(data.draw(st.lists(st.one_of(st.integers(0, v - 1), st.just(-100)), min_size=n, max_size=n)))
    keep = t != -100
    lp = np.log(np_softmax(logits))
    expected = -lp[np.nonzero(keep)[0], t[keep]].sum() / max(keep.sum(), 1)
    np.testing.assert_allclose(F.cross_entropy(leaf(logits), t).numpy(), expected, rtol=1e-9, atol=1e-12)
    assert gradcheck(lambda l: F.cross_entropy(l, t), [leaf(logits)])
    assert_same_as_composed(lambda l: F.cross_entropy(l, t), lambda l: composed_cross_entropy(l, t), [logits])


@given(x=arr((3, 5)), t=st.lists(st.integers(0, 4), min_size=3, max_size=3))
def test_cross_entropy_is_minus_log_softmax_prob_of_target(x, t):
    t = np.array(t)
    p = F.softmax(tensor(x)).numpy()
    rows = [F.cross_entropy(tensor(x[i : i + 1]), t[i : i + 1]).item() for i in range(3)]
    np.testing.assert_allclose(rows, -np.log(p[np.arange(3), t]), rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_extreme_logits(dtype):
    logits = np.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, -1000.0], [1000.0, 1000.0, -1000.0]], dtype=dtype)
    t = np.array([1, 0, 2])
    x = tensor(logits, requires_grad=True)
    loss = F.cross_entropy(x, t)
    loss.backward()
    assert np.isfinite(loss.item()) and np.all(np.isfinite(x.grad))
    # row 0: lse = 1000, loss = 2000; row 1: log 3; row 2: lse = 1000 + log 2, loss = 2000 + log 2
    np.testing.assert_allclose(loss.item(), (2000 + np.log(3) + 2000 + np.log(2)) / 3, rtol=1e-6)


def test_cross_entropy_ignore_index_and_bad_targets():
    logits = tensor(np.random.default_rng(0).standard_normal((4, 5)), requires_grad=True)
    t = np.array([1, -100, 3, -100])
    F.cross_entropy(logits, t).backward()
    np.testing.assert_array_equal(logits.grad[[1, 3]], 0.0)
    allign = tensor(np.ones((2, 5)), requires_grad=True)
    loss = F.cross_entropy(allign, np.array([-100, -100]))
    loss.backward()
    assert loss.item() == 0.0 and np.all(allign.grad == 0)
    with pytest.raises(ValueError, match=r"target 5 at row 2 is outside \[0, 5\)"):
        F.cross_entropy(logits, np.array([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="targets of shape"):
        F.cross_entropy(logits, np.array([0, 1]))
    with pytest.raises(TypeError, match="integers"):
        F.cross_entropy(logits, np.zeros(4))


def test_cross_entropy_accepts_batch_time_layout():
    rng = np.random.default_rng(0)
    logits, t = rng.standard_normal((2, 3, 7)), rng.integers(0, 7, (2, 3))
    a = F.cross_entropy(tensor(logits), t).item()
    b = F.cross_entropy(tensor(logits.reshape(6, 7)), t.reshape(6)).item()
    assert a == pytest.approx(b, rel=1e-12)


# ---- embedding ------------------------------------------------------------------------------
@given(v=side, c=side, data=st.data())
def test_embedding(v, c, data):
    w = data.draw(arr((v, c)))
    ids = np.array(data.draw(st.lists(st.integers(0, v - 1), min_size=1, max_size=8))).reshape(-1, 1)  # duplicates likely
    np.testing.assert_array_equal(F.embedding(ids, leaf(w)).numpy(), w[ids])
    assert gradcheck(lambda w: F.embedding(ids, w), [leaf(w)])
    assert_same_as_composed(lambda w: F.embedding(ids, w), lambda w: w[ids], [w])


def test_embedding_rejects_bad_ids():
    w = tensor(np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"id 4 is outside the table's \[0, 4\)"):
        F.embedding(np.array([0, 4]), w)
    with pytest.raises(TypeError, match="integers"):
        F.embedding(np.array([0.0]), w)


# ---- causal self-attention ------------------------------------------------------------------
@given(b=st.integers(1, 2), nh=st.integers(1, 2), t=side, hs=side, data=st.data())
def test_causal_self_attention(b, nh, t, hs, data):
    q, k, v = (data.draw(arr((b, nh, t, hs))) for _ in range(3))
    np.testing.assert_allclose(F.causal_self_attention(leaf(q), leaf(k), leaf(v)).numpy(), np_attention(q, k, v), rtol=1e-9, atol=1e-12)
    assert gradcheck(F.causal_self_attention, [leaf(q), leaf(k), leaf(v)])
    assert_same_as_composed(F.causal_self_attention, composed_attention, [q, k, v])


@given(t=st.integers(2, 9), data=st.data())
def test_attention_is_causal(t, data):
    q, k, v = (data.draw(arr((1, 2, t, 3))) for _ in range(3))
    pos = data.draw(st.integers(0, t - 2))
    out = F.causal_self_attention(tensor(q), tensor(k), tensor(v)).numpy()
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for a in (q2, k2, v2):
        a[:, :, pos + 1 :] += 7.0  # change everything after pos
    out2 = F.causal_self_attention(tensor(q2), tensor(k2), tensor(v2)).numpy()
    np.testing.assert_array_equal(out2[:, :, : pos + 1], out[:, :, : pos + 1])
    assert not np.allclose(out2[:, :, pos + 1 :], out[:, :, pos + 1 :])


def test_attention_t1_returns_v():
    v = np.random.default_rng(0).standard_normal((2, 3, 1, 5))
    np.testing.assert_allclose(F.causal_self_attention(tensor(v * 3), tensor(v), tensor(v)).numpy(), v, rtol=1e-12)


# ---- dropout --------------------------------------------------------------------------------
def test_dropout():
    x = np.random.default_rng(0).standard_normal((50, 40))
    np.testing.assert_array_equal(F.dropout(tensor(x), 0.5, training=False).numpy(), x)
    y = F.dropout(leaf(x), 0.25, training=True, rng=np.random.default_rng(3)).numpy()
    kept = y != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(y[kept], x[kept] / 0.75)
    assert gradcheck(lambda t: F.dropout(t, 0.3, training=True, rng=np.random.default_rng(5)), [leaf(x[:3, :4])])
    y2 = F.dropout(tensor(x), 0.25, training=True, rng=np.random.default_rng(3)).numpy()
    np.testing.assert_array_equal(y, y2)  # seeded: reproducible
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        F.dropout(tensor(x), 1.0, training=True)


def test_fused_ops_run_in_float32():
    rng = np.random.default_rng(0)
    q = Tensor(rng.standard_normal((1, 2, 4, 8)).astype(np.float32), requires_grad=True)
    out = F.causal_self_attention(q, q, q)
    (out * out).sum().backward()
    assert out.dtype == np.float32 and q.grad.dtype == np.float32


def composed_attention_qkv(qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    heads = qkv.reshape(B, T, 3, n_head, C // n_head).transpose(2, 0, 3, 1, 4)
    y = F.causal_self_attention(heads[0], heads[1], heads[2])
    return y.transpose(0, 2, 1, 3).reshape(B, T, C)


@given(b=st.integers(1, 2), nh=st.integers(1, 3), t=side, hs=st.integers(1, 3), data=st.data())
def test_attention_qkv_equals_split_then_attention(b, nh, t, hs, data):
    qkv = data.draw(arr((b, t, 3 * nh * hs)))
    fused = lambda x: F.attention_qkv(x, nh)  # noqa: E731
    assert gradcheck(fused, [leaf(qkv)])
    assert_same_as_composed(fused, lambda x: composed_attention_qkv(x, nh), [qkv])
    with pytest.raises(ValueError, match="divisible"):
        F.attention_qkv(leaf(np.ones((1, 2, 3 * nh * hs + 1))), nh)


def test_qkv_grad_buffer_only_accepts_the_exact_layout():
    from tinylm.functional import _qkv_grad_buffer
    B, T, NH, hs = 2, 3, 2, 4
    g = np.zeros((B, T, 3, NH, hs))
    dq, dk, dv = (g[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    assert _qkv_grad_buffer(dq, dk, dv) is g
    assert _qkv_grad_buffer(dk, dq, dv) is None  # wrong order
    assert _qkv_grad_buffer(dq, dk, dv.copy()) is None  # not one buffer
    h = np.zeros((B, 3, T, NH, hs))  # same size, other layout
    assert _qkv_grad_buffer(*(h[:, i].transpose(0, 2, 1, 3) for i in range(3))) is None
