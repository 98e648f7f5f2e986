"""16-bit activations through the engine (tinylm/tensor.py ``autocast``): under autocast(fmt)
every layer's output is a bf16/fp16 Tensor and what each op keeps for backward is 16-bit.

The defining equalities, bit for bit: an op under autocast with 16-bit inputs gives exactly the
fp32 op on the decoded inputs, rounded once to the format; its backward gives exactly the fp32
backward (decoding is exact, and gradients stay fp32). Then: the graph of a GPT or a Llama step
keeps half the activation bytes, losses and gradients stay within the format's tolerance of
fp32, arithmetic on float32 values (a loss, DPO's log-prob differences) stays float32, and
generation inside autocast is fp32 (its KV cache is)."""

import numpy as np
import pytest

import tinylm.functional as F
from kernels._formats import from_f32, to_f32
from tinylm.generate import generate
from tinylm.models.gpt import GPT, GPTConfig
from tinylm.models.llama import Llama, LlamaConfig
from tinylm.tensor import Tensor, autocast, autocast_format, saved_bytes

FORMATS = ("bf16", "fp16")
TOL = {"bf16": 2e-2, "fp16": 3e-3}  # model-level: many roundings compound (ops: exact, below)


def _inputs(fmt, shapes, seed=0):
    """16-bit Tensors (requiring grad) and their fp32 twins with the same (decoded) values."""
    rng = np.random.default_rng(seed)
    lo, hi = [], []
    for s in shapes:
        bits = from_f32(rng.standard_normal(s).astype(np.float32), fmt)
        lo.append(Tensor(bits, requires_grad=True, fmt=fmt))
        hi.append(Tensor(to_f32(bits).copy(), requires_grad=True))
    return lo, hi


def _cos_sin(T, hs):
    ang = np.arange(T)[:, None] * (1e4 ** (-np.arange(hs // 2) / (hs // 2)))[None]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


CS = _cos_sin(6, 8)
OPS = {  # name: (input shapes, fn of the input Tensors)
    "linear": ([(2, 5, 8), (8, 12), (12,)], lambda x, w, b: F.linear(x, w, b)),
    "linear_t": ([(2, 5, 8), (12, 8)], lambda x, w: F.linear_t(x, w)),
    "layer_norm": ([(2, 5, 8), (8,), (8,)], lambda x, w, b: F.layer_norm(x, w, b)),
    "rms_norm": ([(2, 5, 8), (8,)], lambda x, w: F.rms_norm(x, w)),
    "gelu": ([(2, 5, 8)], lambda x: F.gelu(x)),
    "swiglu": ([(2, 5, 8), (2, 5, 8)], lambda a, b: F.swiglu(a, b)),
    "rope": ([(2, 6, 2, 8)], lambda x: F.rope(x, *CS)),
    "attention_qkv": ([(2, 6, 24)], lambda qkv: F.attention_qkv(qkv, 2)),
    "causal_attention": ([(2, 4, 6, 8), (2, 2, 6, 8), (2, 2, 6, 8)], lambda q, k, v: F.causal_attention(q, k, v)),
    "embedding": ([(10, 8)], lambda w: F.embedding(np.array([[1, 3, 3], [9, 0, 2]]), w)),
    "add": ([(2, 5, 8), (2, 5, 8)], lambda a, b: a + b),
    "mul": ([(2, 5, 8), (2, 5, 8)], lambda a, b: a * b),
    "reshape_transpose": ([(2, 5, 8)], lambda x: x.reshape(2, 5, 2, 4).transpose(0, 2, 1, 3)),
}
KEEPS_OUTPUT = {"attention_qkv", "causal_attention"}  # flash attention's backward uses out (D = rowsum(dout * out))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_under_autocast_is_the_fp32_op_rounded_once(name, fmt):
    shapes, fn = OPS[name]
    lo, hi = _inputs(fmt, shapes)
    with autocast(fmt):
        out = fn(*lo)
    ref = fn(*hi)
    assert out.fmt == fmt and out.data.dtype == from_f32(np.zeros(1, np.float32), fmt).dtype
    np.testing.assert_array_equal(out.data, from_f32(ref.data, fmt))  # bit for bit
    dout = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    out.backward(dout)
    ref.backward(dout)
    for a, b in zip(lo, hi):
        assert a.grad.dtype == np.float32  # a 16-bit Tensor's gradient is float32
        if name in KEEPS_OUTPUT:  # its backward reads its own output, kept rounded to the format
            assert np.abs(a.grad - b.grad).max() <= 4 * TOL[fmt] * np.abs(b.grad).max()
        else:
            np.testing.assert_array_equal(a.grad, b.grad)  # the fp32 backward, exactly


@pytest.mark.parametrize("fmt", FORMATS)
def test_saved_activations_are_16bit_and_shared_with_the_input(fmt):
    (x, w, b), _ = _inputs(fmt, [(4, 8), (8, 8), (8,)])
    with autocast(fmt):
        h = F.layer_norm(x, Tensor(np.ones(8, np.float32), requires_grad=True), Tensor(np.zeros(8, np.float32)))
        y = F.linear(h, w, b)
    lin = y._ctx
    assert lin.x.dtype == h.data.dtype and np.shares_memory(lin.x, h.data)  # no copy of the input
    assert lin.w.dtype == w.data.dtype and np.shares_memory(lin.w, w.data)
    ln = h._ctx
    assert ln.x2.dtype == x.data.dtype and ln.mean.dtype == np.float32  # statistics stay fp32


def test_float32_arithmetic_stays_float32_under_autocast():
    a = Tensor(np.array([1.0, 2.0, 3.0], np.float32), requires_grad=True)
    with autocast("fp16"):
        loss = (a * 70000.0 - a).sum()  # > 65504: would be inf in fp16
        assert loss.fmt is None and loss.dtype == np.float32 and np.isfinite(loss.item())
        ce = F.cross_entropy(Tensor(from_f32(np.zeros((2, 5), np.float32), "fp16"), fmt="fp16"), np.array([1, 2]))
        assert ce.fmt is None and ce.dtype == np.float32  # a loss from 16-bit logits is fp32
        h = Tensor(from_f32(np.ones((2, 3), np.float32), "fp16"), fmt="fp16") + np.float32(1.0)
        assert h.fmt == "fp16"  # 16-bit in, 16-bit out
    assert autocast_format() is None


def test_retained_graph_runs_backward_twice():
    (x, w), (xr, wr) = _inputs("bf16", [(3, 8), (8, 4)])
    with autocast("bf16"):
        y = F.gelu(F.linear(x, w)).sum()
    y.backward(retain_graph=True)
    g1 = w.grad.copy()
    y.backward()
    np.testing.assert_array_equal(w.grad, 2 * g1)
    assert x.grad.dtype == np.float32


def _models():
    g = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64), seed=0)
    ll = Llama(LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=64), seed=0)
    return {"gpt": g, "llama": ll}


def _step(model, fmt, x, y):
    for p in model.parameters():
        p.grad = None
    with autocast(fmt):
        loss = model.loss(x, y)
    held = saved_bytes(loss)
    loss.backward()
    return loss.item(), [p.grad.copy() for p in model.parameters()], held


@pytest.mark.parametrize("kind", ["gpt", "llama"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_model_step_keeps_half_the_activation_bytes_and_stays_close(kind, fmt):
    model = _models()[kind]
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 64, (4, 16)), rng.integers(0, 64, (4, 16))
    l32, g32, h32 = _step(model, None, x, y)
    l16, g16, h16 = _step(model, fmt, x, y)
    # activations half; what stays fp32 is the head's dw and dx, and per-row statistics
    store = {"bf16": "uint16", "fp16": "float16"}[fmt]
    assert set(h32) <= {"float32", "int64"} and h16[store] > 0
    head = model.config.vocab_size * model.config.n_embd * 4 + x.size * model.config.n_embd * 4
    assert sum(h16.values()) - head <= 0.55 * (sum(h32.values()) - head), (h16, h32, head)
    assert abs(l16 - l32) <= TOL[fmt] * abs(l32)
    for a, b in zip(g16, g32):
        assert np.abs(a - b).max() <= TOL[fmt] * (np.abs(b).max() + 1e-6)


def test_generation_inside_autocast_is_fp32():
    model = _models()["gpt"]
    prompt = np.array([[1, 2, 3]])
    want = generate(model, prompt, 8, temperature=0.0)
    with autocast("bf16"):
        got = generate(model, prompt, 8, temperature=0.0)
        assert autocast_format() == "bf16"  # restored after generation
    np.testing.assert_array_equal(got, want)


def test_16bit_tensor_api():
    t = Tensor(from_f32(np.array([1.5, -2.0], np.float32), "bf16"), requires_grad=True, fmt="bf16")
    np.testing.assert_array_equal(t.numpy(), [1.5, -2.0])  # the values, not the bits
    assert "bf16" in repr(t) and t.detach().fmt == "bf16"
    with pytest.raises(TypeError, match="bf16 Tensor holds uint16"):
        Tensor(np.zeros(2, np.float32), fmt="bf16")
    with pytest.raises(ValueError, match="fmt must be"):
        Tensor(np.zeros(2, np.uint16), fmt="bf8")
    with pytest.raises(ValueError, match="format must be"):
        with autocast("int8"):
            pass
    with pytest.raises(TypeError, match="only floating-point"):
        Tensor(np.zeros(2, np.uint16), requires_grad=True)  # uint16 is bf16 only when tagged


def test_a_16bit_working_copy_generates_as_the_rounded_fp32_model():
    from tinylm.amp.formats import round_model
    from tinylm.optim import ParamStore

    model, twin = _models()["llama"], _models()["llama"]
    store = ParamStore.for_model(model, 0.1)
    store.set_format("fp16")
    assert all(p.fmt == "fp16" for p in model.parameters())
    round_model(twin, "fp16")  # the same values, as float32 arrays
    prompt = np.array([[5, 1, 7], [2, 2, 9]])
    got = generate(model, prompt, 10, temperature=0.0)
    np.testing.assert_array_equal(got, generate(twin, prompt, 10, temperature=0.0))
    # afterwards the parameters are the store's 16-bit views again
    assert all(p.fmt == "fp16" and np.shares_memory(p.data, store.groups[0].p) for p in store.groups[0].params)


def test_assign_rounds_into_a_16bit_tensor():
    t = Tensor(np.zeros(3, np.uint16), fmt="bf16")
    t.assign(np.array([1.0, 1.00390625, -3.0e38], np.float32))  # 1 + 2^-8: a tie, to even (1.0)
    want = to_f32(from_f32(np.array([1.0, 1.00390625, -3.0e38], np.float32), "bf16"))
    assert want[1] == 1.0
    np.testing.assert_array_equal(t.numpy(), want)
