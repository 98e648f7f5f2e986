"""The engine and the primitive ops: forward against NumPy, gradients against finite differences.

Domain for property tests (stated, bounded): shapes of 1-3 dims with sides 1-4, values in
[-2, 2] (log and pow draw from [0.5, 2] where the real function needs positive input; max draws
distinct values, since at a tie the function has no derivative to check).
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinylm
from tinylm import Function, Tensor, gradcheck, no_grad, tensor
from tinylm.tensor import ACCUMULATED

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)
vals = st.floats(-2, 2, allow_nan=False, width=64)
pos = st.floats(0.5, 2, allow_nan=False, width=64)


def arr(shape, elements=vals):
    return hnp.arrays(np.float64, shape, elements=elements)


def leaf(a):
    return tensor(np.array(a, dtype=np.float64), requires_grad=True)


# ---- binary ops with broadcasting -----------------------------------------------------------
BINARY = {
    "add": (lambda a, b: a + b, np.add),
    "sub": (lambda a, b: a - b, np.subtract),
    "mul": (lambda a, b: a * b, np.multiply),
    "div": (lambda a, b: a / b, np.divide),
}


@pytest.mark.parametrize("name", list(BINARY))
@given(data=st.data())
def test_binary_forward_and_grad_with_broadcasting(name, data):
    s = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3))
    a = data.draw(arr(s.input_shapes[0]))
    # keep divisors away from 0 where 1/b^2 explodes
    b = data.draw(arr(s.input_shapes[1], pos if name == "div" else vals))
    op, ref = BINARY[name]
    out = op(leaf(a), leaf(b))
    np.testing.assert_allclose(out.numpy(), ref(a, b), rtol=1e-12)
    assert out.shape == s.result_shape
    assert gradcheck(op, [leaf(a), leaf(b)])


@pytest.mark.parametrize("name", list(BINARY))
def test_right_hand_variants_with_scalars_and_arrays(name):
    op, ref = BINARY[name]
    a = np.array([[0.5, 1.5, -2.0]], dtype=np.float32)
    arr_ = np.array([[1.0], [2.0]], dtype=np.float32)
    for other in (3.0, 2, arr_):
        np.testing.assert_allclose(op(other, tensor(a)).numpy(), ref(other, a), rtol=1e-6)
        np.testing.assert_allclose(op(tensor(a), other).numpy(), ref(a, other), rtol=1e-6)
    # a Python scalar keeps float32 tensors float32
    assert op(tensor(a), 2.5).dtype == np.float32 and op(2.5, tensor(a)).dtype == np.float32


# ---- unary ops ------------------------------------------------------------------------------
UNARY = {
    "neg": (lambda x: -x, np.negative, vals),
    "exp": (lambda x: x.exp(), np.exp, vals),
    "log": (lambda x: x.log(), np.log, pos),
    "tanh": (lambda x: x.tanh(), np.tanh, vals),
    "pow3": (lambda x: x**3, lambda x: x**3, vals),
    "pow_half": (lambda x: x**0.5, np.sqrt, pos),
    "pow_neg": (lambda x: x**-1.5, lambda x: x**-1.5, pos),
    "rpow": (lambda x: 2.0**x, lambda x: 2.0**x, vals),
    "tensor_pow": (lambda x: x ** Tensor(np.full(x.shape, 1.7)), lambda x: x**1.7, pos),
}


@pytest.mark.parametrize("name", list(UNARY))
@given(data=st.data())
def test_unary_forward_and_grad(name, data):
    op, ref, elements = UNARY[name]
    a = data.draw(arr(data.draw(shapes), elements))
    np.testing.assert_allclose(op(leaf(a)).numpy(), ref(a), rtol=1e-12)
    assert gradcheck(op, [leaf(a)])


# ---- reductions -----------------------------------------------------------------------------
def _axis(data, ndim):
    return data.draw(st.one_of(st.none(), st.integers(-ndim, ndim - 1),
                               st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple)))


@pytest.mark.parametrize("name", ["sum", "mean", "max"])
@given(data=st.data())
def test_reductions(name, data):
    shape = data.draw(shapes)
    if name == "max":  # distinct values: max has no derivative at a tie
        n = int(np.prod(shape))
        a = np.asarray(data.draw(st.permutations(list(np.linspace(-2, 2, n)))), dtype=np.float64).reshape(shape)
    else:
        a = data.draw(arr(shape))
    axis = _axis(data, len(shape))
    keepdims = data.draw(st.booleans())
    out = getattr(leaf(a), name)(axis=axis, keepdims=keepdims)
    np.testing.assert_allclose(out.numpy(), getattr(np, name)(a, axis=axis, keepdims=keepdims), rtol=1e-12)
    assert gradcheck(lambda x: getattr(x, name)(axis=axis, keepdims=keepdims), [leaf(a)])


def test_max_splits_gradient_between_ties():
    a = leaf([1.0, 3.0, 3.0])
    a.max().backward()
    np.testing.assert_array_equal(a.grad, [0.0, 0.5, 0.5])


# ---- shape ops ------------------------------------------------------------------------------
@given(data=st.data())
def test_reshape_and_transpose(data):
    a = data.draw(arr(data.draw(shapes)))
    perm = tuple(data.draw(st.permutations(range(a.ndim))))
    np.testing.assert_array_equal(leaf(a).transpose(*perm).numpy(), a.transpose(perm))
    assert gradcheck(lambda x: x.transpose(*perm), [leaf(a)])
    np.testing.assert_array_equal(leaf(a).reshape(-1).numpy(), a.reshape(-1))
    assert gradcheck(lambda x: x.reshape(a.size, 1), [leaf(a)])
    np.testing.assert_array_equal(leaf(a).T.numpy(), a.T)


@given(data=st.data())
def test_index_gather_with_duplicates(data):
    a = data.draw(arr(data.draw(hnp.array_shapes(min_dims=2, max_dims=3, min_side=2, max_side=4))))
    idx = np.array(data.draw(st.lists(st.integers(0, a.shape[0] - 1), min_size=1, max_size=6)))
    cases = [1, -1, slice(None, None, 2), (slice(None), 0), idx, (idx, idx % a.shape[1]), (Ellipsis, 1)]
    for ix in cases:
        np.testing.assert_array_equal(leaf(a)[ix].numpy(), a[ix])
        assert gradcheck(lambda x: x[ix], [leaf(a)])


def test_index_backward_scatter_adds_duplicates():
    a = leaf([10.0, 20.0, 30.0])
    a[np.array([0, 2, 0, 0])].sum().backward()
    np.testing.assert_array_equal(a.grad, [3.0, 0.0, 1.0])
    with pytest.raises(TypeError, match="integer"):
        a[np.array([0.5])]


# ---- matmul ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sa,sb", [
    ((3, 4), (4, 2)), ((4,), (4, 2)), ((3, 4), (4,)), ((4,), (4,)),
    ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (3, 4, 2)), ((5, 4), (2, 4, 3)), ((1, 1), (1, 1)),
])
def test_matmul_shapes_and_grad(sa, sb):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(sa), rng.standard_normal(sb)
    np.testing.assert_allclose((leaf(a) @ leaf(b)).numpy(), a @ b, rtol=1e-12)
    assert gradcheck(lambda x, y: x @ y, [leaf(a), leaf(b)])


@given(m=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 4), data=st.data())
def test_matmul_property(m, k, n, data):
    a, b = data.draw(arr((m, k))), data.draw(arr((k, n)))
    assert gradcheck(lambda x, y: x @ y, [leaf(a), leaf(b)])
    np.testing.assert_allclose((a @ leaf(b)).numpy(), a @ b)  # __rmatmul__ with an ndarray


# ---- the engine -----------------------------------------------------------------------------
def test_node_used_twice():
    a = leaf([3.0])
    b = a + a  # b = 2a
    c = b * b  # c = 4a^2 -> dc/da = 8a = 24
    c.backward()
    np.testing.assert_allclose(a.grad, [24.0])


def test_deep_chain_has_no_recursion_limit():
    x = leaf([1.0])
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.backward()
    np.testing.assert_allclose(x.grad, [1.0001**10_000], rtol=1e-9)


def test_backward_twice_accumulates_like_pytorch():
    a = leaf([1.0, 2.0])
    (a * a).sum().backward()
    (a * a).sum().backward()
    np.testing.assert_allclose(a.grad, 2 * (2 * np.array([1.0, 2.0])))
    loss = (a * 3.0).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    np.testing.assert_allclose(a.grad, 4 * np.array([1.0, 2.0]) + 6.0)


class _Scale3(Function):
    """y = 3 x; backward adds into the gradient sink when there is one."""

    def forward(self, x):
        return 3 * x

    def backward(self, dout):
        sink = self.grad_sink(0)
        if sink is None:
            return (3 * dout,)
        sink += 3 * dout
        return (ACCUMULATED,)


def test_grad_sink_is_the_leaf_grad_and_accumulated_is_not_added_twice():
    a = leaf([1.0, 2.0])
    (_Scale3.apply(a) * a).sum().backward()  # first backward: no .grad yet, no sink
    np.testing.assert_allclose(a.grad, [6.0, 12.0])  # d(3a^2)/da
    buf = a.grad
    (_Scale3.apply(a) * a).sum().backward()  # now the sink is a.grad; the Mul path adds 3a
    assert a.grad is buf
    np.testing.assert_allclose(a.grad, [12.0, 24.0])
    b = leaf([1.0, 2.0])
    for wrong in (np.zeros(3), np.zeros(2, dtype=np.float32)):  # shape or dtype: no sink
        b.grad = wrong
        assert _Scale3.apply(b)._node.ctx.grad_sink(0) is None
    b.grad = np.zeros(2)
    assert _Scale3.apply(b)._node.ctx.grad_sink(0) is b.grad
    c = leaf([1.0, 2.0])  # a non-leaf input never offers a sink
    h = c * 1.0
    assert _Scale3.apply(h)._node.ctx.grad_sink(0) is None


def test_backward_on_freed_graph_raises():
    a = leaf([1.0])
    loss = (a * a).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_graph_is_freed_after_backward():
    a = leaf(np.ones(4))
    h = a.exp()
    loss = h.sum()
    ctx = h._ctx
    loss.backward()
    assert h._ctx is None and not hasattr(ctx, "out")  # saved arrays released


def test_no_grad_records_nothing():
    a = leaf([1.0])
    with no_grad():
        b = a * 2 + 1
        assert not tinylm.is_grad_enabled()
    assert tinylm.is_grad_enabled()
    assert not b.requires_grad and b._ctx is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        b.backward()


def test_bad_gradient_shape_names_the_op():
    class BadOp(Function):
        def forward(self, x):
            return x * 2

        def backward(self, dout):
            return (dout[:1],)

    a = leaf(np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"BadOp\.backward returned a gradient of shape \(1, 2\) for input 0, which has shape \(3, 2\)"):
        BadOp.apply(a).sum().backward()


def test_backward_needs_scalar_or_grad():
    a = leaf([1.0, 2.0])
    with pytest.raises(RuntimeError, match="single-element"):
        (a * 2).backward()
    (a * 2).backward(np.array([1.0, 1.0]))
    np.testing.assert_allclose(a.grad, [2.0, 2.0])
    with pytest.raises(ValueError, match="grad has shape"):
        (a * 2).backward(np.ones(3))


def test_dtypes():
    assert tensor([1.0, 2.0]).dtype == np.float32
    assert tensor(np.zeros(2)).dtype == np.float64
    assert tensor([1, 2]).dtype == np.int64
    assert tensor([1.0], dtype=np.float64).dtype == np.float64
    assert (tensor([1.0]) * tensor([2.0])).dtype == np.float32
    with pytest.raises(TypeError, match="floating-point"):
        tensor([1, 2], requires_grad=True)
    x = tensor([1.0, 2.0], requires_grad=True)
    y = x.astype(np.float64)
    (y * y).sum().backward()
    assert x.grad.dtype == np.float32 and y.dtype == np.float64


def test_gpu_unavailable_says_why():
    from tinylm.backend import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present: the error path is not reachable")
    with pytest.raises(RuntimeError, match="GPU backend is unavailable"):
        tensor([1.0]).to("gpu")
    assert tensor([1.0]).to("cpu").device == "cpu"


def test_gradcheck_catches_a_wrong_backward():
    class WrongSquare(Function):
        def forward(self, x):
            self.x = x
            return x * x

        def backward(self, dout):
            return (dout * self.x,)  # should be 2x

    x = leaf(np.arange(1.0, 4.0))
    with pytest.raises(tinylm.GradcheckError, match=r"input 0.*worst element.*analytic.*numeric"):
        gradcheck(lambda t: WrongSquare.apply(t), [x])
    big = leaf(np.arange(1.0, 101.0).reshape(10, 10))  # large: random-direction mode
    with pytest.raises(tinylm.GradcheckError, match="random direction"):
        gradcheck(lambda t: WrongSquare.apply(t), [big], full_jacobian_limit=10)
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda t: t * 2, [tensor([1.0], requires_grad=True)])
