"""LoRA: zero adapters are the base model, merge/unmerge, frozen weights, adapter-only state."""
import numpy as np
import pytest

from tinylm.models import GPT, GPTConfig
from tinylm.nn import Module, Parameter
from tinylm.optim import ParamStore
from tinylm.posttrain.lora import LoRALinear, apply_lora, disabled


def model(dtype="float64", seed=1):
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50, dtype=dtype), seed=seed)


IDX = np.random.default_rng(0).integers(0, 50, (2, 12))


def test_zero_b_gives_exactly_the_base_outputs():
    base = model()
    ref = base(IDX)[0].numpy()
    lm = apply_lora(base, rank=4, alpha=8, targets="all", seed=0)
    assert len(lm.wrapped) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    # B = 0, so the adapter adds exactly +0.0 to every output: bit-for-bit equal
    assert (lm(IDX)[0].numpy() == ref).all()


def test_merge_then_unmerge_restores_the_weights():
    lm = apply_lora(model(), rank=4, alpha=8, seed=0)
    rng = np.random.default_rng(1)
    for _, p in lm.adapters():
        p.data[...] = rng.normal(0, 0.3, p.shape)
    w0 = {n: p.numpy().copy() for n, p in lm.named_parameters()}
    with_adapters = lm(IDX)[0].numpy()
    lm.merge()
    merged = lm(IDX)[0].numpy()  # the forward skips the adapters: the merged weights carry them
    np.testing.assert_allclose(merged, with_adapters, rtol=0, atol=1e-12)
    lm.unmerge()
    for n, p in lm.named_parameters():
        # (w + d) - d is w up to one rounding of w + d: half an ulp of |w + d| per element
        tol = np.spacing(np.abs(w0[n]) + 1.0)
        assert (np.abs(p.numpy() - w0[n]) <= tol).all(), n
    np.testing.assert_allclose(lm(IDX)[0].numpy(), with_adapters, rtol=0, atol=1e-12)


def test_only_adapters_train_and_frozen_weights_get_no_gradient():
    lm = apply_lora(model("float32"), rank=2, alpha=4, targets="c_attn,mlp.c_proj", seed=0)
    assert lm.wrapped == ["h.0.attn.c_attn", "h.0.mlp.c_proj", "h.1.attn.c_attn", "h.1.mlp.c_proj"]
    store = ParamStore.for_model(lm, 0.0)
    assert store.numel() == sum(p.size for _, p in lm.adapters())
    _, loss = lm(IDX, IDX)
    loss.backward()
    for n, p in lm.named_parameters():
        if "lora_" in n:
            assert p.grad is not None
        else:
            assert p.grad is None, n
    assert any(np.abs(p.grad).sum() > 0 for _, p in lm.adapters())  # A's gradient (B = 0 -> dA = 0, dB != 0)


def test_disabled_is_the_base_and_state_dict_is_adapters_only():
    base = model()
    ref = base(IDX)[0].numpy()
    lm = apply_lora(base, rank=2, alpha=4, seed=0)
    for _, p in lm.adapters():
        p.data[...] = 0.1
    assert not (lm(IDX)[0].numpy() == ref).all()
    with disabled(lm):
        assert (lm(IDX)[0].numpy() == ref).all()
    sd = lm.state_dict()
    assert set(sd) == {n for n, _ in lm.adapters()}
    other = apply_lora(model(), rank=2, alpha=4, seed=5)
    other.load_state_dict(sd)
    assert (other(IDX)[0].numpy() == lm(IDX)[0].numpy()).all()
    lm.merge()
    with pytest.raises(RuntimeError):
        with disabled(lm):
            pass


class OutIn(Module):
    """A Linear-like layer in PyTorch's (out, in) layout, as a Llama projection."""
    layout = "out_in"

    def __init__(self, n_in, n_out, rng):
        self.weight = Parameter(rng.normal(0, 0.1, (n_out, n_in)), dtype=np.float64)
        self.bias = None

    def forward(self, x):
        from tinylm import F
        return F.linear_t(x, self.weight)


class Two(Module):
    def __init__(self):
        rng = np.random.default_rng(0)
        self.q_proj = OutIn(6, 5, rng)
        self.config = None

    def forward(self, x):
        return self.q_proj(x)


def test_out_in_layout_merges_transposed():
    import tinylm

    m = Two()
    lm = apply_lora(m, rank=2, alpha=2, targets="q_proj", seed=0)
    assert isinstance(m.q_proj, LoRALinear)
    lm.adapters()[1][1].data[...] = np.random.default_rng(2).normal(0, 0.5, (2, 5))
    x = tinylm.tensor(np.random.default_rng(3).normal(size=(3, 6)))
    y = lm(x).numpy()
    lm.merge()
    np.testing.assert_allclose(lm(x).numpy(), y, rtol=0, atol=1e-12)


# ---- the fused adapter op: NumPy reference, gradcheck, unchanged gradients, no frozen products ----
from tinylm import F, gradcheck, tensor  # noqa: E402
from tinylm.posttrain.lora import lora_linear, lora_linear_ref  # noqa: E402


def op_inputs(rows, layout, bias, grad_w=True, seed=0):
    rng = np.random.default_rng(seed)
    c_in, c_out, r = 5, 7, 3
    w = rng.normal(0, 0.5, (c_in, c_out) if layout == "in_out" else (c_out, c_in))
    arrays = [rng.normal(size=(2, rows, c_in)), w, rng.normal(0, 0.5, (c_in, r)), rng.normal(0, 0.5, (r, c_out))]
    if bias:
        arrays.append(rng.normal(size=c_out))
    return [tensor(a, requires_grad=grad_w or i != 1) for i, a in enumerate(arrays)]


# rows per batch element 4 -> 8 rows >= C_in = 5: the adapter merged on the fly; 2 -> 4 rows: factored
@pytest.mark.parametrize("rows", [4, 2])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_the_numpy_reference_and_gradchecks(rows, layout, bias):
    ins = op_inputs(rows, layout, bias)
    fn = lambda x, w, a, b, *rest: lora_linear(x, w, a, b, rest[0] if rest else None, 1.7, layout)  # noqa: E731
    ref = lora_linear_ref(*[t.numpy() for t in ins[:4]], ins[4].numpy() if bias else None, 1.7, layout)
    np.testing.assert_allclose(fn(*ins).numpy(), ref, rtol=0, atol=1e-12)
    assert gradcheck(fn, ins)
    # a frozen weight (the LoRA case): the others still check, and W gets no gradient
    ins = op_inputs(rows, layout, bias, grad_w=False)
    assert gradcheck(fn, ins)
    fn(*ins).sum().backward()
    assert ins[1].grad is None and all(t.grad is not None for i, t in enumerate(ins) if i != 1)


def composed(x, layer):
    """The adapter written with the primitive ops (the graph LoRALinear used to build)."""
    lin = F.linear if layer.layout == "in_out" else F.linear_t
    return lin(x, layer.weight, layer.bias) + F.linear(F.linear(x, layer.lora_A) * layer.scale, layer.lora_B)


@pytest.mark.parametrize("n_rows", [12, 3])  # 24 rows: merged on the fly; 6 < C_in = 16: factored
def test_lora_gradients_equal_the_composed_graphs_in_float64(monkeypatch, n_rows):
    idx = IDX[:, :n_rows]
    lm = apply_lora(model(), rank=3, alpha=6, seed=0)
    rng = np.random.default_rng(4)
    for _, p in lm.adapters():
        p.data[...] = rng.normal(0, 0.2, p.shape)

    def grads():
        for _, p in lm.adapters():
            p.grad = None
        logits, loss = lm(idx, idx)
        loss.backward()
        return logits.numpy(), {n: p.grad.copy() for n, p in lm.adapters()}

    out, g = grads()
    monkeypatch.setattr(LoRALinear, "forward", lambda self, x: composed(x, self))
    out_c, g_c = grads()
    np.testing.assert_allclose(out, out_c, rtol=0, atol=1e-12)
    assert g.keys() == g_c.keys() and len(g) == 16
    for n in g:
        np.testing.assert_allclose(g[n], g_c[n], rtol=1e-10, atol=1e-13, err_msg=n)
        assert np.abs(g[n]).sum() > 0, n


def test_frozen_weights_cost_no_weight_gradient_product(monkeypatch):
    """Every product that reduces over the N = B*T rows is a weight gradient (x^T dout): with
    the base frozen, only the rank-r adapter ones may run, none of a layer's size."""
    import kernels

    calls = []
    real_get = kernels.get

    def spy(op, *arrays, **kw):
        fn = real_get(op, *arrays, **kw)
        if op not in ("matmul", "matmul_acc"):
            return fn

        def rec(a, b, *rest):
            calls.append((op, a.shape, b.shape))
            return fn(a, b, *rest)
        return rec

    lm = apply_lora(model("float32"), rank=2, alpha=4, seed=0)
    rng = np.random.default_rng(5)
    for _, p in lm.adapters():
        p.data[...] = rng.normal(0, 0.1, p.shape)
    N = IDX.size  # 24: no model dimension (16, 48, 64, 50) equals it
    monkeypatch.setattr(kernels, "get", spy)
    _, loss = lm(IDX, IDX)
    loss.backward()
    assert calls and not [c for c in calls if c[1][-1] == N], calls  # no (C, N) @ (N, C') product
    assert all(p.grad is None for n, p in lm.named_parameters() if "lora_" not in n)
    assert all(p.grad is not None and np.abs(p.grad).sum() > 0 for _, p in lm.adapters())
    # the same model trained in full does run them: the spy sees weight gradients
    calls.clear()
    full = model("float32")
    _, loss = full(IDX, IDX)
    loss.backward()
    assert [c for c in calls if c[1][-1] == N]


# ---- vocabulary rows added by grow_vocab: trained beside the adapters, the old rows frozen ----
from tinylm.posttrain.chat import grow_vocab  # noqa: E402
from tinylm.posttrain.lora import join_rows, join_rows_ref  # noqa: E402


@pytest.mark.parametrize("axis", [0, 1])
def test_join_rows_matches_the_numpy_reference_and_gradchecks(axis):
    rng = np.random.default_rng(7)
    base = rng.normal(size=(6, 4) if axis == 0 else (4, 6))
    added = rng.normal(size=(2, 4) if axis == 0 else (4, 2))
    b, a = tensor(base), tensor(added, requires_grad=True)
    out = join_rows(b, a, 4, axis)
    assert (out.numpy() == join_rows_ref(base, added, 4, axis)).all()
    weights = tensor(rng.normal(size=out.shape))
    assert gradcheck(lambda x: join_rows(b, x, 4, axis) * weights, [a])
    with pytest.raises(ValueError):
        join_rows(b, tensor(np.ones((2, 3))), 4, axis)


def grown(model_fn, n_new=3):
    m = model_fn()
    old = m.config.vocab_size
    names = grow_vocab(m, old + n_new, seed=0)
    return m, {n: old for n in names}


@pytest.mark.parametrize("kind", ["gpt", "llama-untied"])
def test_added_rows_train_and_the_old_rows_stay(kind):
    """Chat tokens added to a pretrained model must learn (their embedding and head rows), while
    every row the checkpoint had stays bit for bit: LoRA plus the added rows, nothing else."""
    from tinylm.models.llama import Llama, LlamaConfig

    make = model if kind == "gpt" else (lambda: Llama(LlamaConfig(
        n_layer=1, n_head=2, n_kv_head=1, n_embd=16, block_size=16, vocab_size=50, dtype="float64"), seed=1))
    m, added = grown(make)
    assert len(added) == (1 if kind == "gpt" else 2)  # tied wte; embed_tokens + lm_head
    base_w = {n: p.numpy().copy() for n, p in m.named_parameters()}
    idx = np.random.default_rng(1).integers(0, 53, (2, 12))
    idx[:, ::3] = 50 + np.arange(idx[:, ::3].size).reshape(2, -1) % 3  # every new token in the input and targets
    ref = m(idx)[0].numpy()
    lm = apply_lora(m, rank=2, alpha=4, seed=0, added_rows=added)
    assert (lm(idx)[0].numpy() == ref).all()  # B = 0, rows unchanged: exactly the base
    rows = [p for n, p in lm.trainable() if n.startswith("added_rows.")]
    assert [n for n, _ in lm.trainable() if n.startswith("added_rows.")] == ["added_rows." + n for n in added]
    store = ParamStore.for_model(lm, 0.0)
    assert store.numel() == sum(p.size for _, p in lm.adapters()) + 3 * 16 * len(added)
    from tinylm.optim import AdamW

    opt = AdamW(store, lr=1e-2)
    for _ in range(3):
        store.zero_grad()
        lm(idx, idx)[1].backward()
        assert all(np.abs(p.grad).sum() > 0 for p in rows)
        opt.step()
    for n, p in m.named_parameters():  # the frozen weights, the old and the new rows' base copies
        if n in base_w:
            assert (p.numpy() == base_w[n]).all(), n
    # the added rows trained (every vocabulary weight here is (V, C): rows on axis 0)
    assert min(np.abs(p.numpy() - base_w[n][50:]).max() for n, p in zip(added, rows)) > 1e-4
    with disabled(lm):  # the reference: the base, with the added rows as initialised
        assert (lm(idx)[0].numpy() == ref).all()
    trained = lm(idx)[0].numpy()
    sd = lm.state_dict()
    m2, added2 = grown(make)
    other = apply_lora(m2, rank=2, alpha=4, seed=5, added_rows=added2)
    other.load_state_dict(sd)
    assert (other(idx)[0].numpy() == trained).all()
    full = lm.merged_model()  # plain names, the trained rows written into the weights
    assert {n for n, _ in full.named_parameters()} == set(base_w)
    np.testing.assert_allclose(full(idx)[0].numpy(), trained, rtol=0, atol=1e-12)
    weights = dict(full.named_parameters())
    for n in added:  # merged: the old rows as they were, the added ones as trained
        assert (weights[n].numpy()[:50] == base_w[n][:50]).all(), n
        assert (weights[n].numpy()[50:] == sd["added_rows." + n]).all(), n


@pytest.mark.parametrize("kind", ["gpt", "llama-untied"])
def test_the_heads_partial_weight_gradient_equals_the_whole_products_rows(monkeypatch, kind):
    """A head reading a joined weight computes dW for the added rows only (F._trained_from);
    the rows' gradients equal those kept from the whole (V, C) product."""
    from tinylm import functional
    from tinylm.models.llama import Llama, LlamaConfig

    make = model if kind == "gpt" else (lambda: Llama(LlamaConfig(
        n_layer=1, n_head=2, n_kv_head=1, n_embd=16, block_size=16, vocab_size=50, dtype="float64"), seed=1))
    idx = np.random.default_rng(2).integers(0, 53, (2, 12))

    def rows_grads():
        m, added = grown(make)
        lm = apply_lora(m, rank=2, alpha=4, seed=0, added_rows=added)
        lm(idx, idx)[1].backward()
        return [g.grad.copy() for n, g in lm.trainable() if n.startswith("added_rows.")]

    part = rows_grads()
    monkeypatch.setattr(functional, "_trained_from", lambda w, axis: {})
    whole = rows_grads()
    assert len(part) == len(whole) >= 1
    for a, b in zip(part, whole):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
        assert np.abs(a).sum() > 0


@pytest.mark.parametrize("kind", ["gpt", "llama-untied"])
@pytest.mark.parametrize("head", ["loss", "sequence_logprobs"])
def test_the_fused_head_on_a_grown_vocabulary_equals_the_logits_path(kind, head):
    """SFT's fused head + loss and DPO's fused sequence log-probs on a joined head weight: the
    same value and the same gradients of every trainable (adapters, added rows) as the logits
    path, with the head's dW made for the added rows only (kernels/head_ce.py dw_from)."""
    from tinylm.models.llama import Llama, LlamaConfig
    from tinylm.posttrain.logprobs import sequence_logprobs

    make = model if kind == "gpt" else (lambda: Llama(LlamaConfig(
        n_layer=1, n_head=2, n_kv_head=1, n_embd=16, block_size=16, vocab_size=50, dtype="float64"), seed=1))
    rng = np.random.default_rng(4)
    idx = rng.integers(0, 53, (3, 12))
    tgt = np.roll(idx, -1, axis=1)
    tgt[:, :4] = -100
    tgt[:, 6] = 51  # an added token among the targets
    wt = tensor(np.array([1.5, -0.5, 2.0]))
    m, added = grown(make)
    lm = apply_lora(m, rank=2, alpha=4, seed=0, added_rows=added)
    for _, p in lm.adapters():  # B != 0: the adapters change the hidden states
        p.data[...] = rng.normal(size=p.shape) * 0.1
    res = []
    for fused in (False, True):
        for _, p in lm.trainable():
            p.grad = None
        if head == "loss":
            out = lm.loss(idx, tgt) if fused else lm(idx, tgt)[1]
        else:
            out = (lm.sequence_logprobs(idx, tgt) if fused else sequence_logprobs(lm(idx)[0], tgt)) * wt
        out.sum().backward()
        res.append((out.numpy(), {n: p.grad.copy() for n, p in lm.trainable()}))
    (v0, g0), (v1, g1) = res
    assert any(n.startswith("added_rows.") for n in g1) and g0.keys() == g1.keys()
    np.testing.assert_allclose(v1, v0, rtol=1e-12)
    for n in g0:
        np.testing.assert_allclose(g1[n], g0[n], rtol=1e-9, atol=1e-13, err_msg=n)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_linear_with_trained_rows_gradchecks(layout):
    rng = np.random.default_rng(3)
    x = tensor(rng.normal(size=(3, 4)), requires_grad=True)
    base = tensor(rng.normal(size=(6, 4) if layout == "out_in" else (4, 6)))
    rows = tensor(rng.normal(size=(2, 4) if layout == "out_in" else (4, 2)), requires_grad=True)
    axis = 0 if layout == "out_in" else 1
    lin = F.linear_t if layout == "out_in" else F.linear
    assert gradcheck(lambda x, r: lin(x, join_rows(base, r, 4, axis)), [x, rows])
