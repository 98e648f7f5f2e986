"""GPT: shapes, parameter names, KV-cache generation against uncached, sampling rules,
state dicts, the optimizer and the LR schedule."""
import math

import numpy as np

import tinylm
import pytest

from tinylm import gradcheck, tensor
from tinylm.models import GPT, GPTConfig
from tinylm.generate import sample
from tinylm.optim import AdamW, cosine_lr

TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=23)


def tiny(**kw):
    return GPT(GPTConfig(**{**TINY, **kw}), seed=kw.pop("seed", 0) if "seed" in kw else 0)


def test_gpt2_parameter_names_and_count():
    m = tiny()
    names = [n for n, _ in m.named_parameters()]
    assert names[:2] == ["wte.weight", "wpe.weight"]
    for n in ("h.0.ln_1.weight", "h.0.attn.c_attn.weight", "h.0.attn.c_proj.bias", "h.1.mlp.c_fc.weight",
              "h.1.mlp.c_proj.weight", "h.1.ln_2.bias", "ln_f.weight"):
        assert n in names
    C, V, T, L = 16, 23, 12, 2
    per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    assert m.num_params() == V * C + T * C + L * per_block + 2 * C  # head tied: no extra V*C
    assert m.h[0].attn.c_attn.weight.shape == (C, 3 * C)  # (in, out): GPT-2's Conv1D layout


def test_forward_shapes_loss_and_errors():
    m = tiny()
    idx = np.random.default_rng(0).integers(0, 23, (3, 12))
    logits, loss = m(idx, idx)
    assert logits.shape == (3, 12, 23) and loss.shape == ()
    # at init the logits are small: the loss is near log V
    assert abs(m(idx, np.roll(idx, 1))[1].item() - math.log(23)) < 0.3
    assert m(idx)[1] is None
    with pytest.raises(ValueError, match="longer than block_size"):
        m(np.zeros((1, 13), dtype=np.int64))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        m(np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(n_embd=10, n_head=3)


def test_whole_model_gradient_matches_finite_differences():
    m = tiny(dtype="float64", n_embd=8, vocab_size=11, block_size=6)
    idx = np.random.default_rng(1).integers(0, 11, (2, 6))
    params = m.parameters()

    def loss_of(*ps):  # the params are the model's own tensors: gradcheck perturbs them in place
        return m(idx, np.roll(idx, -1, axis=1))[1]

    assert gradcheck(loss_of, params, n_directions=3, full_jacobian_limit=0)  # random directions per tensor


def test_kv_cache_logits_equal_uncached():
    m = tiny()
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, 23, (2, 5))
    cache = m.new_cache(2)
    seq = prompt
    with tinylm.no_grad():
        logits = m(prompt, cache=cache)[0].numpy()[:, -1]
        for pos in range(5, 12):
            full = m(seq)[0].numpy()[:, -1]
            np.testing.assert_allclose(logits, full, rtol=1e-4, atol=1e-5)
            nxt = rng.integers(0, 23, (2, 1))
            seq = np.concatenate([seq, nxt], axis=1)
            if pos < 11:
                assert cache.pos == pos
                logits = m(nxt, cache=cache)[0].numpy()[:, -1]


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=0.9, top_k=5), dict(temperature=1.2, top_p=0.8)])
def test_cached_generation_equals_uncached(kw):
    m = tiny()
    prompt = np.random.default_rng(3).integers(0, 23, (2, 4))
    a = m.generate(prompt, 8, seed=7, use_cache=True, **kw)  # stays within the 12-token context
    b = m.generate(prompt, 8, seed=7, use_cache=False, **kw)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 12)
    np.testing.assert_array_equal(a[:, :4], prompt)


def test_generation_past_the_context_and_long_prompts():
    m = tiny()
    long_prompt = np.arange(30) % 23  # longer than block_size: cropped
    out = m.generate(long_prompt, 20, temperature=0.0)
    assert out.shape == (50,)
    ref = m.generate(long_prompt[-12:], 1, temperature=0.0, use_cache=False)
    assert out[30] == ref[-1]  # the first new token sees the last block_size tokens either way
    with pytest.raises(ValueError, match="empty"):
        m.generate(np.zeros((1, 0), dtype=np.int64), 3)


def test_stop_tokens_end_generation():
    m = tiny()
    greedy = m.generate([1, 2, 3], 6, temperature=0.0)
    first = int(greedy[3])
    out = m.generate([1, 2, 3], 6, temperature=0.0, stop_tokens=[first])
    assert out.tolist() == [1, 2, 3, first]


def test_sampling_rules():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert sample(logits, 0.0, None, None, rng)[0] == 0
    draws = np.array([sample(logits, 1.0, 2, None, rng)[0] for _ in range(400)])
    assert set(draws) <= {0, 1} and 0.5 < (draws == 0).mean() < 0.75  # renormalised 0.625
    draws = np.array([sample(logits, 1.0, None, 0.7, rng)[0] for _ in range(400)])
    assert set(draws) <= {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
    draws = np.array([sample(logits, 1.0, None, None, rng)[0] for _ in range(4000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_state_dict_round_trip():
    a, b = tiny(), GPT(GPTConfig(**TINY), seed=1)
    idx = np.arange(12)[None] % 23
    assert not np.allclose(a(idx)[0].numpy(), b(idx)[0].numpy())
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(idx)[0].numpy(), b(idx)[0].numpy())
    bad = a.state_dict()
    bad["wte.weight"] = bad["wte.weight"][:5]
    with pytest.raises(ValueError, match="wte.weight has shape"):
        b.load_state_dict(bad)
    del bad["wte.weight"]
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict(bad)


def test_overfits_one_batch():
    m = tiny()
    idx = np.random.default_rng(4).integers(0, 23, (4, 12))
    tgt = np.roll(idx, -1, axis=1)
    opt = AdamW(m.param_groups(0.0), lr=3e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = m(idx, tgt)[1]
        loss.backward()
        opt.clip_grad_norm(1.0)
        opt.step()
    assert m(idx, tgt)[1].item() < 0.05


def test_adamw_matches_the_formula():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(7)
    grads = [rng.standard_normal(7) for _ in range(3)]
    w = tensor(p0.copy(), requires_grad=True)
    opt = AdamW([{"params": [w], "weight_decay": 0.1}], lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    p, m, v = p0.copy(), np.zeros(7), np.zeros(7)
    for t, g in enumerate(grads, start=1):
        opt.zero_grad()
        w.grad[...] = g
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        p = p - 0.01 * (0.1 * p + (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.99**t)) + 1e-8))
    np.testing.assert_allclose(w.data, p, rtol=1e-10)


def test_grad_clipping_and_norm():
    a = tensor(np.array([3.0, 0.0]), requires_grad=True)
    b = tensor(np.array([4.0]), requires_grad=True)
    opt = AdamW([a, b], lr=0.1)
    opt.zero_grad()
    (a * tensor([3.0, 0.0])).sum().backward()
    (b * tensor([4.0])).sum().backward()
    assert opt.clip_grad_norm(1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(np.concatenate([a.grad, b.grad]), [0.6, 0.0, 0.8], rtol=1e-5)
    assert opt.grad_norm() == pytest.approx(1.0, rel=1e-5)


def test_cosine_schedule():
    lrs = [cosine_lr(s, 1.0, 0.1, 10, 110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway through the decay
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:]))


def test_nucleus_without_a_full_sort_equals_the_sorted_reference():
    """top-p's mask from a partial selection equals the full stable sort's, ties included."""
    from tinylm.generate import nucleus, nucleus_ref

    rng = np.random.default_rng(0)
    for trial in range(200):
        V = int(rng.choice([5, 64, 300, 8192]))
        logits = rng.normal(0, rng.choice([0.1, 1.0, 5.0]), (3, V))
        if trial % 3 == 0:  # ties: values drawn from a few levels, and masked (-inf) tokens
            logits = np.round(logits * 2) / 2
            logits[:, rng.random(V) < 0.3] = -np.inf
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        for top_p in (0.05, 0.5, 0.9, 0.999):
            np.testing.assert_array_equal(nucleus(p, top_p), nucleus_ref(p, top_p))
