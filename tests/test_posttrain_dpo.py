"""Log-prob op, the DPO loss and its identities, GRPO's advantages and the equal-reward rule."""
import math

import numpy as np
import pytest

import tinylm
from tinylm.models import GPT, GPTConfig
from tinylm.posttrain.chat import IGNORE, ChatFormat
from tinylm.posttrain.dpo import DPO, PairBatches, dpo_loss, reference_logprobs, render_pairs, softplus
from tinylm.posttrain.data import Fit
from tinylm.posttrain.grpo import GRPO, group_advantages
from tinylm.posttrain.logprobs import sequence_logprobs, token_logprobs, token_logprobs_ref
from tinylm.tokenizer import BPETokenizer
from tinylm.tokenizer.bpe import EOT


def f64(a, grad=True):
    return tinylm.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_token_logprobs_match_the_numpy_reference(dtype):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (2, 5, 11)).astype(dtype)
    t = rng.integers(0, 11, (2, 5))
    t[0, :2] = IGNORE
    out = token_logprobs(tinylm.tensor(z), t)
    assert out.dtype == np.float64 and out.shape == (2, 5)
    ref = token_logprobs_ref(z, t)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12 if dtype == np.float64 else 2e-5)
    assert (out.numpy()[0, :2] == 0).all()
    seq = sequence_logprobs(tinylm.tensor(z), t).numpy()
    np.testing.assert_allclose(seq, ref.sum(1), atol=1e-4)
    mean = sequence_logprobs(tinylm.tensor(z), t, average=True).numpy()
    np.testing.assert_allclose(mean, ref.sum(1) / np.array([3, 5]), atol=1e-4)


def test_token_logprobs_gradcheck_float64():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 7, (3, 4))
    t[1, 3] = IGNORE
    z = f64(rng.normal(0, 2, (3, 4, 7)))
    w = rng.normal(size=(3, 4))
    assert tinylm.gradcheck(lambda x: (token_logprobs(x, t) * w).sum(), [z])


def test_dpo_loss_is_ln2_when_policy_equals_reference_and_gradchecks():
    lp = np.array([-3.0, -10.5, -0.25])
    loss, rc, rr = dpo_loss(f64(lp), f64(lp - 1), lp, lp - 1, beta=0.1)
    assert abs(loss.item() - math.log(2)) < 1e-12 and (rc == 0).all() and (rr == 0).all()
    rng = np.random.default_rng(2)
    ins = [f64(rng.normal(-5, 2, 4)) for _ in range(4)]
    assert tinylm.gradcheck(lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.3)[0], ins)
    big = f64([800.0, -800.0])  # a huge margin: no overflow, gradients finite
    out = softplus(big)
    out.sum().backward()
    assert np.isfinite(out.numpy()).all() and np.allclose(big.grad, [1.0, 0.0])


def chat_model(dtype="float64"):
    tok = BPETokenizer()
    tok.add_special_tokens([EOT])
    chat = ChatFormat(tok)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=48, vocab_size=tok.vocab_size, dtype=dtype), seed=0)
    return m, chat


def test_dpo_step_zero_equals_ln2_on_a_model_in_float64():
    m, chat = chat_model()
    recs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": "yes" * (i + 1), "rejected": "no"}
            for i in range(5)]
    pairs = render_pairs(chat, recs, Fit(49, "truncate"))
    ref = reference_logprobs(m, pairs, pad_id=0)
    data = PairBatches(pairs, ref, 5, seed=0, pad_id=0)
    loss, metrics = DPO(beta=0.1).loss(m, data.next())
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert metrics["reward_margin"] == 0.0 and metrics["reward_accuracy"] == 0.0
    loss.backward()
    assert any(np.abs(p.grad).sum() > 0 for p in m.parameters() if p.grad is not None)


def test_group_advantages_and_the_equal_reward_rule():
    a = group_advantages([1, 0, 0, 1], scale_std=False)
    assert np.allclose(a, [0.5, -0.5, -0.5, 0.5])
    s = group_advantages([1, 0, 0, 1], scale_std=True)
    assert np.allclose(s, [1, -1, -1, 1], atol=1e-5)
    assert group_advantages([1, 1, 1]) is None and group_advantages([0.0, 0.0]) is None


def test_grpo_groups_with_equal_rewards_leave_the_loss_and_its_denominator():
    m, chat = chat_model("float32")
    # a reward that only prompt "b" can vary: prompt "a" always scores 1 (equal group)
    def reward(rec, text):
        return 1.0 if rec["id"] == "a" else float(len(text) % 2)
    recs = [{"id": "a", "prompt": [{"role": "user", "content": "a"}]},
            {"id": "b", "prompt": [{"role": "user", "content": "b"}]}]
    obj = GRPO(chat, reward, group_size=4, max_new_tokens=5, seed=0)
    loss, metrics = obj.loss(m, recs)
    assert metrics["groups_kept"] in (0.0, 0.5)
    only_a = GRPO(chat, reward, group_size=4, max_new_tokens=5, seed=0)
    loss_a, met_a = only_a.loss(m, [recs[0]])
    assert loss_a is None and met_a["groups_kept"] == 0.0  # nothing to learn: the trainer skips it
    if loss is not None:  # the loss is b's alone: the same as running b by itself with the same samples
        st = GRPO(chat, reward, group_size=4, max_new_tokens=5, seed=0)
        st.rng.integers(2**62)  # consume a's seed draw
        loss_b, _ = st.loss(m, [recs[1]])
        assert abs(loss.item() - loss_b.item()) < 1e-6


def test_padded_batch_shifts_masks_and_pads_for_dpo_and_grpo():
    from tinylm.posttrain.data import padded_batch
    x, y = padded_batch([([5, 6, 7, 8], [0, 0, 1, 1]), ([1, 2], [0, 1])], pad_id=9)
    assert x.tolist() == [[5, 6, 7], [1, 2, 9]]
    assert y.tolist() == [[IGNORE, 7, 8], [2, IGNORE, IGNORE]]  # pads are never targets
    # DPO's pair batch: the chosen rows, then the rejected rows
    pairs = [{"chosen": ([1, 2, 3], [0, 1, 1]), "rejected": ([1, 4], [0, 1])}]
    from tinylm.posttrain.dpo import pair_batch
    px, py = pair_batch(pairs, pad_id=0)
    assert px.tolist() == [[1, 2], [1, 4]] and py.tolist() == [[2, 3], [4, IGNORE]]


# ---- sequence log-probs through the fused LM head (model.sequence_logprobs) -----------------
def _models():
    from tinylm.models import Llama, LlamaConfig
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=41, dtype="float64"), seed=1)
    llama = Llama(LlamaConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=16, block_size=12, vocab_size=41,
                              dtype="float64"), seed=1)
    return {"gpt_tied": gpt, "llama_untied": llama}


@pytest.mark.parametrize("name", ["gpt_tied", "llama_untied"])
@pytest.mark.parametrize("kind", ["sum", "mean", "token"])
def test_fused_logprobs_equal_the_logits_path(name, kind):
    """model.sequence_logprobs (DPO's, sum or mean) and model.token_logprobs (GRPO's) against the
    same of the logits: values, and every parameter's gradient under a weight per row (DPO's
    backward) or per token plus a nonlinear term (GRPO's advantages and KL); a prompt masked, a
    row with no kept token (0 and no gradient)."""
    m = _models()[name]
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 41, (4, 12))
    tgt = np.roll(idx, -1, axis=1)
    tgt[:, :5] = IGNORE
    tgt[2] = IGNORE
    weight = tinylm.tensor(rng.normal(size=(4, 12) if kind == "token" else 4))
    res = []
    for fused in (False, True):
        m.zero_grad()
        if kind == "token":
            lp = m.token_logprobs(idx, tgt) if fused else token_logprobs(m(idx)[0], tgt)
            loss = (lp * weight).sum() + (lp * 0.5).exp().sum()
        else:
            avg = kind == "mean"
            lp = m.sequence_logprobs(idx, tgt, average=avg) if fused else \
                sequence_logprobs(m(idx)[0], tgt, average=avg)
            loss = (lp * weight).sum()
        loss.backward()
        res.append((lp.numpy(), {n: p.grad.copy() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = res
    assert l1.dtype == np.float64 and l1.shape == ((4, 12) if kind == "token" else (4,))
    assert (l1[2] == 0.0).all() and (kind != "token" or (l1[:, :5] == 0).all())
    np.testing.assert_allclose(l1, l0, rtol=1e-12, atol=1e-14)
    for n in g0:
        np.testing.assert_allclose(g1[n], g0[n], rtol=1e-9, atol=1e-13, err_msg=n)


def test_fused_logprobs_gradcheck_and_errors():
    from tinylm.posttrain.logprobs import head_sequence_logprobs, head_token_logprobs
    rng = np.random.default_rng(3)
    x, w = f64(rng.normal(size=(2, 3, 5))), f64(rng.normal(size=(7, 5)))
    t = np.array([[1, IGNORE, 6], [0, 0, 2]])
    wt = np.array([0.5, -2.0])
    for avg in (False, True):
        assert tinylm.gradcheck(lambda a, b: (head_sequence_logprobs(a, b, t, average=avg) * wt).sum(), [x, w])
    wtok = rng.normal(size=(2, 3))  # a weight per token (GRPO's)
    assert tinylm.gradcheck(lambda a, b: (head_token_logprobs(a, b, t) * wtok).sum(), [x, w])
    np.testing.assert_allclose(head_token_logprobs(x, w, t).numpy(), token_logprobs_ref(x.numpy() @ w.numpy().T, t),
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(head_sequence_logprobs(x, w, t).numpy(),
                               token_logprobs_ref(x.numpy() @ w.numpy().T, t).sum(1), rtol=1e-12)
    with pytest.raises(ValueError, match="outside"):
        head_sequence_logprobs(x, w, np.array([[1, 2, 7], [0, 0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        head_sequence_logprobs(x, w, t[:, :2])
    with pytest.raises(ValueError, match=r"need x \(B, T, C\)"):
        head_sequence_logprobs(x, f64(rng.normal(size=(7, 4))), t)


def test_fused_sequence_logprobs_in_float32_match_float64():
    """The model's dtype float32: the per-token log-softmax is float32, the sums float64."""
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=40, vocab_size=41, dtype="float32"), seed=2)
    m64 = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=40, vocab_size=41, dtype="float64"), seed=2)
    m64.load_state_dict({k: v.astype(np.float64) for k, v in m.state_dict().items()})
    idx = np.random.default_rng(4).integers(0, 41, (2, 40))
    tgt = np.roll(idx, -1, axis=1)
    a, b = m.sequence_logprobs(idx, tgt).numpy(), m64.sequence_logprobs(idx, tgt).numpy()
    assert a.dtype == np.float64
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_grpo_loss_through_the_fused_head_equals_the_logits_path(monkeypatch):
    """GRPO's loss (advantages and the k3 KL to a reference) and its gradients are the same
    with model.token_logprobs and with the (B, T, V) logits it replaced."""
    import contextlib

    from tinylm.models.base import LanguageModel
    m, chat = chat_model("float64")
    ref, _ = chat_model("float64")
    for p in ref.parameters():
        p.data[...] += 0.01  # a reference that differs from the policy: the KL is not 0
    recs = [{"id": "b", "prompt": [{"role": "user", "content": "b"}]}]

    def reward(rec, text):
        return float(len(text) % 2)

    def run():
        obj = GRPO(chat, reward, group_size=4, max_new_tokens=5, seed=0, kl_coef=0.3,
                   reference=lambda: contextlib.nullcontext(ref))
        m.zero_grad()
        loss, metrics = obj.loss(m, recs)
        assert loss is not None and metrics["kl"] > 0
        loss.backward()
        return loss.item(), {n: p.grad.copy() for n, p in m.named_parameters()}

    l1, g1 = run()
    monkeypatch.setattr(LanguageModel, "token_logprobs",
                        lambda self, x, y, ignore_index=IGNORE: token_logprobs(self(x)[0], y, ignore_index))
    l0, g0 = run()
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    for n in g0:
        np.testing.assert_allclose(g1[n], g0[n], rtol=1e-9, atol=1e-13, err_msg=n)


def test_fused_logprobs_hand_dw_back_only_once_it_is_added(monkeypatch):
    """The token op's backward makes dw (kernels/head_ce.py's pool): once added into the
    gradient buffer it serves the next call; with no buffer it becomes the gradient, not pooled."""
    from kernels import head_ce
    from tinylm.posttrain.logprobs import head_token_logprobs
    monkeypatch.setattr(head_ce, "POOL_BYTES", 1)
    monkeypatch.setattr(head_ce, "_free", {})
    rng = np.random.default_rng(7)
    x, w = f64(rng.normal(size=(2, 3, 5))), f64(rng.normal(size=(7, 5)))
    t = np.array([[1, IGNORE, 6], [0, 0, 2]])
    head_token_logprobs(x, w, t).sum().backward()
    assert ((7, 5), "<f8") not in head_ce._free
    first = w.grad.copy()
    w.grad[...] = 0  # now a gradient buffer exists
    head_token_logprobs(x, w, t).sum().backward()
    assert ((7, 5), "<f8") in head_ce._free
    np.testing.assert_allclose(w.grad, first, rtol=1e-12, atol=1e-15)
    w.grad[...] = 0
    head_token_logprobs(x, w, t).sum().backward()  # with the reused dw
    np.testing.assert_allclose(w.grad, first, rtol=1e-12, atol=1e-15)
