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
