"""The fused LM head + cross-entropy (kernels/head_ce.py, F.head_cross_entropy, the models'
``return_logits=False``): kernel variants against the reference, poisoned outputs, the op against
the unfused composition (F.linear_t + F.cross_entropy) for the loss and every gradient, float64
finite differences, and the models (tied GPT head, untied Llama head) both ways."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernels
from kernels import head_ce
from tinylm import functional as F
from tinylm.gradcheck import gradcheck
from tinylm.models import GPT, GPTConfig, Llama, LlamaConfig
from tinylm.tensor import Tensor, no_grad

IGN = -100


def case(N, C, V, dt, seed=0, ignore_every=3, scale=1.0):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((N, C))).astype(dt)
    w = (scale * rng.standard_normal((V, C))).astype(dt)
    t = rng.integers(0, V, N)
    if ignore_every:
        t[::ignore_every] = IGN
    return x, w, t


def check_outputs(got, want, tol):
    for g, r in zip(got, want):
        assert (g is None) == (r is None)
        if r is not None:
            assert g.dtype == r.dtype and g.shape == r.shape
            np.testing.assert_allclose(g, r, rtol=tol, atol=tol)


# ---- kernel variants ------------------------------------------------------------------------
# (N, C, V, rows, vb): several row chunks and vocabulary blocks (a last partial one), one block
# only, fewer blocks than threads, V=1, one row
SHAPES = [(7, 5, 13, 3, 4), (300, 16, 1000, 64, 128), (5, 6, 300, None, None), (1, 3, 1, None, None),
          (40, 8, 3, 16, 1), (1, 4, 50, None, None)]


@pytest.mark.parametrize("dt, tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("N, C, V, rows, vb", SHAPES)
def test_cpu_kernel_matches_reference(dt, tol, N, C, V, rows, vb):
    x, w, t = case(N, C, V, dt)
    sc = 1.0 / max(1, int((t != IGN).sum()))
    for want_dx, want_dw in ((True, True), (True, False), (False, True), (False, False)):
        want = head_ce.head_ce_ref(x, w, t, IGN, sc, want_dx, want_dw)
        got = head_ce.head_ce_cpu(x, w, t, IGN, sc, want_dx, want_dw, rows=rows, vb=vb)
        check_outputs(got, want, tol)


@pytest.mark.parametrize("dt, tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("N, C, V, rows, vb", SHAPES[:3])
def test_a_scale_per_row(dt, tol, N, C, V, rows, vb):
    """scale (N,): each row's gradient weighted by its own number (a sequence log-prob's
    backward), in the reference and the CPU kernel alike; the same as one number when equal."""
    x, w, t = case(N, C, V, dt)
    s = np.random.default_rng(1).normal(size=N)
    want = head_ce.head_ce_ref(x, w, t, IGN, s, True, True)
    check_outputs(head_ce.head_ce_cpu(x, w, t, IGN, s, True, True, rows=rows, vb=vb), want, tol)
    one = head_ce.head_ce_ref(x, w, t, IGN, 1.0, True, True)  # the rows' own gradients, then weighted
    np.testing.assert_allclose(want[2], one[2] * s[:, None].astype(dt), rtol=tol, atol=tol)
    for a, b in zip(head_ce.head_ce_cpu(x, w, t, IGN, np.full(N, 0.3), True, True, rows=rows, vb=vb),
                    head_ce.head_ce_cpu(x, w, t, IGN, 0.3, True, True, rows=rows, vb=vb)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="scale"):
        head_ce.head_ce_ref(x, w, t, IGN, s[:-1], True, True)


@pytest.mark.parametrize("N, C, V, rows, vb", SHAPES[:3])
def test_dw_of_the_rows_from_k_only(N, C, V, rows, vb):
    """dw_from=k: dw is the whole product's rows k.. (a grown vocabulary's trainable rows), in
    the reference and the CPU kernel, k inside a vocabulary block, on a block edge, V-1 and V."""
    x, w, t = case(N, C, V, np.float64)
    whole = head_ce.head_ce_ref(x, w, t, IGN, 0.5, True, True)
    for k in sorted({1, V // 2, V - 1, V, vb or 1}):
        want = head_ce.head_ce_ref(x, w, t, IGN, 0.5, True, True, k)
        assert want[3].shape == (V - k, C)
        np.testing.assert_allclose(want[3], whole[3][k:], rtol=1e-12, atol=1e-14)
        check_outputs(head_ce.head_ce_cpu(x, w, t, IGN, 0.5, True, True, k, rows=rows, vb=vb), want, 1e-12)


def test_reference_is_the_unfused_math():
    """The reference against cross_entropy's kernels on the whole (N, V) logits, lse 0 where ignored."""
    from kernels.cross_entropy import cross_entropy_bwd_ref, cross_entropy_fwd_ref
    x, w, t = case(30, 7, 40, np.float64)
    z = x @ w.T
    loss, lse = cross_entropy_fwd_ref(z, t, IGN)
    dz = cross_entropy_bwd_ref(z, t, lse, np.full(30, 0.1), IGN)
    got = head_ce.head_ce_ref(x, w, t, IGN, 0.1, True, True)
    check_outputs(got, (loss, np.where(t != IGN, lse, 0), dz @ w, dz.T @ x), 1e-12)


def test_all_rows_ignored_gives_zeros():
    x, w, _ = case(6, 4, 9, np.float32)
    t = np.full(6, IGN)
    for fn in (head_ce.head_ce_ref, head_ce.head_ce_cpu):
        loss, lse, dx, dw = fn(x, w, t, IGN, 1.0, True, True)
        for a in (loss, lse, dx, dw):
            assert np.all(a == 0)


def test_extreme_logits_stay_finite():
    x, w, t = case(9, 3, 20, np.float32)
    w[5] = 400.0  # logits of +-1000s in row-dependent places
    w[7] = -400.0
    for fn in (head_ce.head_ce_ref, head_ce.head_ce_cpu):
        out = fn(x, w, t, IGN, 0.2, True, True)
        assert all(np.all(np.isfinite(a)) for a in out)
    check_outputs(head_ce.head_ce_cpu(x, w, t, IGN, 0.2, True, True, rows=4, vb=6),
                  head_ce.head_ce_ref(x, w, t, IGN, 0.2, True, True), 2e-4)


@pytest.mark.parametrize("dt", [np.float64, np.float32])
def test_poisoned_outputs(monkeypatch, dt):
    """Every buffer the CPU kernel gets (outputs, chunk logits, partials) starts as NaN: an element
    a prange loop skipped would stay NaN (docs/performance.md, "a parallel loop that silently
    did nothing")."""
    monkeypatch.setattr(head_ce, "_new", lambda shape, dtype: np.full(shape, np.nan, dtype=dtype))
    x, w, t = case(70, 9, 130, dt, ignore_every=0)
    s = np.linspace(-1, 1, 70)
    for scale, k in ((1 / 70, 0), (s, 0), (1 / 70, 40)):  # one scale, a scale per row, dw of rows 40..
        want = head_ce.head_ce_ref(x, w, t, IGN, scale, True, True, k)
        head_ce._free.clear()  # nothing reused: every buffer from the poisoned _new
        got = head_ce.head_ce_cpu(x, w, t, IGN, scale, True, True, k, rows=32, vb=16)
        assert all(np.all(np.isfinite(a)) for a in got)
        check_outputs(got, want, 1e-12 if dt == np.float64 else 2e-5)


def test_reused_buffers_give_the_same_results(monkeypatch):
    """The pool (kernels/head_ce.py: the chunk's logits and dw kept for the next call): buffers
    handed back full of NaN are overwritten, so the results equal the reference; the autograd op
    hands dw back once backward has added it into the gradient buffer and the graph is freed,
    and not when a view of it went out as the gradient."""
    monkeypatch.setattr(head_ce, "POOL_BYTES", 1)
    monkeypatch.setattr(head_ce, "_free", {})
    x, w, t = case(70, 9, 130, np.float32)
    want = head_ce.head_ce_ref(x, w, t, IGN, 0.5, True, True)
    for _ in range(2):
        for shape in ((70, 130), (130, 9)):  # Z (rows, V) and dw (V, C), poisoned
            head_ce.give_back(np.full(shape, np.nan, dtype=np.float32))
        got = head_ce.head_ce_cpu(x, w, t, IGN, 0.5, True, True, rows=100)
        check_outputs(got, want, 2e-5)
        assert got[3].base is None and (130, 9) not in {k[0] for k in head_ce._free}  # dw is the caller's now
    # through the op: the gradient buffer exists (sink), the dw buffer comes back after backward
    wt = leaf(w)
    wt.grad = np.zeros_like(w)
    head_ce._free.clear()
    F.head_cross_entropy(leaf(x), wt, t).backward()
    assert ((130, 9), "<f4") in head_ce._free
    first = wt.grad.copy()
    wt.grad[...] = 0
    F.head_cross_entropy(leaf(x), wt, t).backward()  # with the reused dw
    np.testing.assert_array_equal(wt.grad, first)
    wt2 = leaf(w)  # no gradient buffer: a view of dw becomes the gradient (copied), not handed back
    head_ce._free.clear()
    F.head_cross_entropy(leaf(x), wt2, t).backward()
    assert ((130, 9), "<f4") not in head_ce._free
    np.testing.assert_allclose(wt2.grad, first, rtol=1e-6, atol=1e-7)


def test_dispatch_and_16bit():
    from kernels._formats import from_f32, to_f32
    x, w, t = case(12, 5, 33, np.float32)
    assert kernels.get("head_ce", x) is head_ce.head_ce_cpu
    xb, wb = from_f32(x, "bf16"), from_f32(w, "bf16")
    loss, lse, dx, dw = kernels.get("head_ce", xb, wb)(xb, wb, t, IGN, 0.125, True, True)
    assert loss.dtype == np.float32 and lse.dtype == np.float32 and dx.dtype == xb.dtype and dw.dtype == wb.dtype
    want = head_ce.head_ce_ref(to_f32(xb), to_f32(wb), t, IGN, 0.125, True, True)
    np.testing.assert_allclose(loss, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_f32(dx), want[2], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_a_16bit_weight_is_read_block_by_block(monkeypatch, fmt):
    """A bf16/fp16 w (a 16-bit run's working copy) with float32 x: each thread decodes the block
    it multiplies, so the results are those of the decoded weight, bit for bit (the same GEMMs on
    the same float32 numbers); poisoned buffers show every block was decoded. Through the op:
    a 16-bit parameter reaches the kernel undecoded, the reference and the GPU variant get it
    decoded whole; loss and gradients equal the float32 weight's either way."""
    from kernels._formats import from_f32, to_f32
    from tinylm.tensor import autocast

    monkeypatch.setattr(head_ce, "_new", lambda shape, dtype: np.full(shape, np.nan, dtype=dtype))
    x, w, t = case(70, 9, 130, np.float32)
    w16 = from_f32(w, fmt)
    w32 = to_f32(w16).copy()
    s = np.linspace(-1, 1, 70).astype(np.float32)
    for scale, k in ((1 / 70, 0), (s, 0), (1 / 70, 40)):
        got = head_ce.head_ce_cpu(x, w16, t, IGN, scale, True, True, k, rows=32, vb=16)
        want = head_ce.head_ce_cpu(x, w32, t, IGN, scale, True, True, k, rows=32, vb=16)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    for backend in ("cpu", "ref"):
        monkeypatch.setenv("TINYLM_KERNELS", "ref" if backend == "ref" else "")
        results = []
        for wt in (Tensor(w16, requires_grad=True, fmt=fmt), leaf(w32)):
            xt = leaf(x)
            with autocast(fmt):
                loss = F.head_cross_entropy(xt, wt, t)
            loss.backward()
            results.append((loss.item(), xt.grad, wt.grad))
        (l16, dx16, dw16), (l32, dx32, dw32) = results
        assert l16 == l32 and dw16.dtype == np.float32
        np.testing.assert_array_equal(dx16, dx32)
        np.testing.assert_array_equal(dw16, dw32)


# ---- the autograd op against the composition ------------------------------------------------
def leaf(a):
    return Tensor(a, requires_grad=True)


def fused_and_composed(x, w, t, dout=1.0, **kw):
    """(loss, dx, dw) of F.head_cross_entropy and of F.cross_entropy(F.linear_t(...))."""
    out = []
    for fn in (lambda xx, ww: F.head_cross_entropy(xx, ww, t, IGN),
               lambda xx, ww: F.cross_entropy(F.linear_t(xx, ww), t, IGN)):
        xx, ww = leaf(x), leaf(w)
        loss = fn(xx, ww)
        (loss * dout).backward()
        out.append((loss.item(), xx.grad, ww.grad))
    return out


@pytest.mark.parametrize("dt, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("ignore_every", [0, 3, 1])
def test_fused_equals_composed(dt, tol, ignore_every):
    x, w, t = case(2 * 37, 11, 300, dt, ignore_every=ignore_every)
    x = x.reshape(2, 37, 11)
    t = t.reshape(2, 37)
    (lf, dxf, dwf), (lc, dxc, dwc) = fused_and_composed(x, w, t, dout=2.5)
    assert dxf.shape == x.shape and dxf.dtype == x.dtype and dwf.dtype == w.dtype
    np.testing.assert_allclose(lf, lc, rtol=tol, atol=tol)
    np.testing.assert_allclose(dxf, dxc, rtol=tol, atol=tol)
    np.testing.assert_allclose(dwf, dwc, rtol=tol, atol=tol)
    if ignore_every == 1:  # no target at all: 0, zero gradients, no NaN
        assert lf == 0.0 and not dxf.any() and not dwf.any()


def test_gradient_goes_into_an_existing_buffer():
    """A weight that already holds a gradient (the ParamStore's buffer) gets dout * dw added in
    place (Function.grad_sink), the same array object afterwards."""
    x, w, t = case(20, 6, 50, np.float64)
    ww = leaf(w)
    buf = np.full_like(w, 0.5)
    ww.grad = buf
    (F.head_cross_entropy(Tensor(x), ww, t, IGN) * 3.0).backward()
    assert ww.grad is buf
    (_, _, dwc), = fused_and_composed(x, w, t, dout=3.0)[1:]
    np.testing.assert_allclose(buf, 0.5 + dwc, rtol=1e-12, atol=1e-12)


def test_backward_twice_with_retain_graph():
    """The kept dx, dw are not handed to a leaf as its .grad (which later backwards add into)."""
    x, w, t = case(20, 6, 50, np.float64)
    xx, ww = leaf(x), leaf(w)
    loss = F.head_cross_entropy(xx, ww, t, IGN)
    for _ in range(3):
        loss.backward(retain_graph=True)
    (_, dxc, dwc), = fused_and_composed(x, w, t)[1:]
    np.testing.assert_allclose(xx.grad, 3 * dxc, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ww.grad, 3 * dwc, rtol=1e-12, atol=1e-14)


def test_no_grad_and_frozen_inputs():
    x, w, t = case(20, 6, 50, np.float32)
    with no_grad():
        a = F.head_cross_entropy(leaf(x), leaf(w), t, IGN)
    assert not a.requires_grad
    b = F.cross_entropy(F.linear_t(Tensor(x), Tensor(w)), t, IGN)
    np.testing.assert_allclose(a.item(), b.item(), rtol=1e-6)
    xx = leaf(x)  # a frozen head: only dx
    F.head_cross_entropy(xx, Tensor(w), t, IGN).backward()
    np.testing.assert_allclose(xx.grad, fused_and_composed(x, w, t)[1][1], rtol=1e-5, atol=1e-7)


def test_argument_errors():
    x, w, t = case(4, 3, 5, np.float32)
    with pytest.raises(ValueError, match="outside"):
        F.head_cross_entropy(leaf(x), leaf(w), np.array([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="shape"):
        F.head_cross_entropy(leaf(x), leaf(w), t[:3])
    with pytest.raises(ValueError, match="do not fit"):
        F.head_cross_entropy(leaf(x), leaf(w.T.copy()), t)
    with pytest.raises(TypeError, match="integers"):
        F.head_cross_entropy(leaf(x), leaf(w), t.astype(np.float32))


def test_gradcheck_float64():
    x, w, t = case(6, 4, 7, np.float64)
    assert gradcheck(lambda xx, ww: F.head_cross_entropy(xx, ww, t, IGN), [leaf(x), leaf(w)])
    x3 = x.reshape(2, 3, 4)
    t3 = np.array([[1, IGN, 6], [0, 0, 2]])
    assert gradcheck(lambda xx, ww: F.head_cross_entropy(xx, ww, t3, IGN), [leaf(x3), leaf(w)])


@given(n=st.integers(1, 9), c=st.integers(1, 6), v=st.integers(1, 40), ign=st.integers(0, 4),
       seed=st.integers(0, 2**16))
def test_fused_equals_composed_hypothesis(n, c, v, ign, seed):
    x, w, t = case(n, c, v, np.float64, seed=seed, ignore_every=ign)
    (lf, dxf, dwf), (lc, dxc, dwc) = fused_and_composed(x, w, t)
    np.testing.assert_allclose(lf, lc, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dxf, dxc, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dwf, dwc, rtol=1e-10, atol=1e-12)


def test_reference_backend_gives_the_same(monkeypatch):
    x, w, t = case(2 * 37, 11, 300, np.float64)
    want = fused_and_composed(x, w, t)[0]
    monkeypatch.setenv("TINYLM_KERNELS", "ref")
    got = fused_and_composed(x, w, t)[0]
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-13)


# ---- models ---------------------------------------------------------------------------------
def gpt():
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=41, dtype="float64"), seed=1)


def llama():
    return Llama(LlamaConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=16, block_size=12, vocab_size=41,
                             dtype="float64"), seed=1)


@pytest.mark.parametrize("make", [gpt, llama], ids=["gpt_tied", "llama_untied"])
def test_models_fused_equals_logits_path(make):
    m = make()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 41, (3, 12))
    tgt = np.roll(idx, -1, axis=1)
    tgt[0, :5] = IGN  # a masked prompt, SFT-style
    tgt[2, -1] = IGN
    res = []
    for kw in ({}, {"return_logits": False}):
        m.zero_grad()
        logits, loss = m(idx, tgt, **kw)
        loss.backward()
        res.append((logits, loss.item(), {n: p.grad.copy() for n, p in m.named_parameters()}))
    (lg, l0, g0), (none, l1, g1) = res
    assert lg.shape == (3, 12, 41) and none is None
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    assert g0.keys() == g1.keys()
    for n in g0:
        np.testing.assert_allclose(g1[n], g0[n], rtol=1e-9, atol=1e-13, err_msg=n)
    np.testing.assert_allclose(m.loss(idx, tgt).item(), l0, rtol=1e-12)
    assert m(idx)[1] is None and m(idx, return_logits=False)[0].shape == (3, 12, 41)  # no targets: logits
