"""The fused one-token decoding step (kernels/decode.py, tinylm/models/decode.py): each kernel
against its NumPy reference (poisoned scratch, rows at different positions, GQA, MHA, both RoPE
layouts, float32 and float64), one thread and several giving identical bits, and the models'
fast path against their general block code (``decode.ENABLED = False``)."""
import numba
import numpy as np
import pytest

import tinylm
from kernels import decode as K
from kernels.rope import rope_tables
from tinylm.models import GPT, GPTConfig, Llama, LlamaConfig
from tinylm.models import decode as D

TOL = {np.float32: 2e-5, np.float64: 1e-12}


def _r(rng, *shape, scale=0.1, dt=np.float32):
    return (scale * rng.standard_normal(shape)).astype(dt)


def _poisoned(names_shapes, dt):
    return {(n, s, np.dtype(dt).str): np.full(s, np.nan, dt) for n, s in names_shapes}


def _gpt_case(rng, B, dt, C=48, NH=4, L=20, Fh=192):
    p = (1 + _r(rng, C, dt=dt), _r(rng, C, dt=dt), _r(rng, C, 3 * C, dt=dt), _r(rng, 3 * C, dt=dt),
         _r(rng, C, C, dt=dt), _r(rng, C, dt=dt), 1 + _r(rng, C, dt=dt), _r(rng, C, dt=dt),
         _r(rng, C, Fh, dt=dt), _r(rng, Fh, dt=dt), _r(rng, Fh, C, dt=dt), _r(rng, C, dt=dt))
    KV = _r(rng, 2, B, NH, L, C // NH, scale=1.0, dt=dt)
    return p, KV, _r(rng, B, C, scale=1.0, dt=dt)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("pos", [[5], [3, 9, 0]])
def test_gpt_block_matches_reference(dt, pos):
    rng = np.random.default_rng(0)
    pos = np.array(pos)
    B, C, NH, L, Fh = len(pos), 48, 4, 20, 192
    p, KV, x = _gpt_case(rng, B, dt)
    want_kv, got_kv = KV.copy(), KV.copy()
    want = K.gpt_block_ref(x.copy(), pos, p, want_kv[0], want_kv[1], 1e-5)
    work = _poisoned([("h", (B, C)), ("qkv", (B, 3 * C)), ("att", (B, C)), ("hid", (B, Fh)), ("sc", (B * NH, L))], dt)
    got = K.gpt_block_cpu(x.copy(), pos, p, got_kv[0], got_kv[1], 1e-5, work)
    np.testing.assert_allclose(got, want, rtol=TOL[dt], atol=TOL[dt])
    np.testing.assert_allclose(got_kv, want_kv, rtol=TOL[dt], atol=TOL[dt])


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("nkv", [2, 4])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("pos", [[5], [3, 9, 0]])
def test_llama_block_matches_reference(dt, nkv, interleaved, pos):
    rng = np.random.default_rng(1)
    pos = np.array(pos)
    B, C, NH, L, Fh = len(pos), 48, 4, 20, 96
    hs = C // NH
    p = (1 + _r(rng, C, dt=dt), _r(rng, C, C, dt=dt), _r(rng, nkv * hs, C, dt=dt), _r(rng, nkv * hs, C, dt=dt),
         _r(rng, C, C, dt=dt), 1 + _r(rng, C, dt=dt), _r(rng, Fh, C, dt=dt), _r(rng, Fh, C, dt=dt), _r(rng, C, Fh, dt=dt))
    cos, sin = rope_tables(hs, np.arange(L), 10000.0, dt)
    KV = _r(rng, 2, B, nkv, L, hs, scale=1.0, dt=dt)
    x = _r(rng, B, C, scale=1.0, dt=dt)
    want_kv, got_kv = KV.copy(), KV.copy()
    want = K.llama_block_ref(x.copy(), pos, p, want_kv[0], want_kv[1], cos, sin, interleaved, 1e-6)
    work = _poisoned([("h", (B, C)), ("q", (B, C)), ("kv", (B, 2 * nkv * hs)), ("att", (B, C)), ("g", (B, Fh)),
                      ("u", (B, Fh)), ("sc", (B * NH, L))], dt)
    got = K.llama_block_cpu(x.copy(), pos, p, got_kv[0], got_kv[1], cos, sin, interleaved, 1e-6, work)
    np.testing.assert_allclose(got, want, rtol=TOL[dt], atol=TOL[dt])
    np.testing.assert_allclose(got_kv, want_kv, rtol=TOL[dt], atol=TOL[dt])


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("B", [1, 3])
def test_head_matches_reference(dt, rms, B):
    rng = np.random.default_rng(2)
    C = 48
    x, W = _r(rng, B, C, scale=1.0, dt=dt), _r(rng, 100, C, dt=dt)
    w, b = 1 + _r(rng, C, dt=dt), _r(rng, C, dt=dt)
    got = K.head_cpu(x, w, None if rms else b, 1e-5, W, rms, _poisoned([("h", (B, C))], dt))
    np.testing.assert_allclose(got, K.head_ref(x, w, b, 1e-5, W, rms), rtol=TOL[dt], atol=TOL[dt])


def test_one_thread_and_all_threads_give_the_same_bits():
    """The runner may switch between one thread and all of Numba's: the column blocks stay the
    same, so the results are bit for bit equal."""
    if numba.get_num_threads() < 2:
        pytest.skip("one thread only")
    rng = np.random.default_rng(3)
    pos = np.array([3, 9])
    p, KV, x = _gpt_case(rng, 2, np.float32)
    outs = []
    for use in (1, numba.get_num_threads()):
        key = ("<f4", 2)
        K._run_gpt.state[key] = [use, 0, 10 ** 9, 4, {}]  # pinned: no tries of the other
        try:
            kv = KV.copy()
            outs.append((K.gpt_block_cpu(x.copy(), pos, p, kv[0], kv[1], 1e-5), kv))
        finally:
            K._run_gpt.state.pop(key, None)
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])


# ---- the models: fast path == general block code --------------------------------------------
def _model(kind, dt="float32"):
    if kind == "gpt":
        return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=23, dtype=dt))
    if kind == "gpt-nobias":
        return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=23, bias=False, dtype=dt))
    kw = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=16, block_size=12, vocab_size=23, dtype=dt)
    if kind == "llama-mha":
        kw["n_kv_head"] = 4
    if kind == "llama-tied":
        kw["tie_embeddings"] = True
    if kind == "llama-interleaved":
        kw["rope_interleaved"] = True
    return Llama(LlamaConfig(**kw))


def _steps(m, prompts, new, enabled, monkeypatch):
    """Prefill each row alone into its row of one cache, then decode all rows together with a
    start per row: (logits of every step, the final cache)."""
    monkeypatch.setattr(D, "ENABLED", enabled)
    rng = np.random.default_rng(9)
    cache = m.new_cache(len(prompts))
    out = []
    with tinylm.no_grad():
        for r, pr in enumerate(prompts):
            m(pr[None], cache=cache.row(r), start=0)
        lens = np.array([len(pr) for pr in prompts])
        for _ in range(new):
            nxt = rng.integers(0, 23, (len(prompts), 1))
            out.append(m(nxt, cache=cache, start=lens)[0].numpy()[:, -1])
            lens = lens + 1
    return np.array(out), cache


KINDS = ["gpt", "gpt-nobias", "llama", "llama-mha", "llama-tied", "llama-interleaved"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_fast_step_equals_general_path(kind, dt, monkeypatch):
    m = _model(kind, dt)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 23, n) for n in (3, 7, 5)]
    fast, fc = _steps(m, prompts, 4, True, monkeypatch)
    slow, sc = _steps(m, prompts, 4, False, monkeypatch)
    tol = 2e-5 if dt == "float32" else 1e-12
    np.testing.assert_allclose(fast, slow, rtol=tol, atol=tol)
    for a, b in zip(fc.k + fc.v, sc.k + sc.v):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_fast_step_runs_and_reference_variant_agrees(kind, monkeypatch):
    """The step goes through the fast path (not silently the general one), and under
    TINYLM_KERNELS=ref its NumPy reference gives the same logits."""
    m = _model(kind)
    cache = m.new_cache(1)
    with tinylm.no_grad():
        m(np.array([[1, 2, 3]]), cache=cache)
        step = D.gpt_step if kind == "gpt" else D.llama_step
        fast = step(m, np.array([[4]]), cache, 3)
        assert fast is not None and cache.pos == 4 and cache.work
        monkeypatch.setenv("TINYLM_KERNELS", "ref")
        ref = step(m, np.array([[4]]), cache, 3)
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), rtol=2e-5, atol=2e-5)


def test_fast_step_declines_what_it_does_not_cover(monkeypatch):
    m = _model("gpt")
    cache = m.new_cache(1)
    idx = np.array([[4]])
    assert D.gpt_step(m, idx, cache, 0) is None  # grad enabled: the general path raises its error
    with tinylm.no_grad():
        assert D.gpt_step(m, np.array([[4, 5]]), cache, 0) is None  # a prefill
        assert D.gpt_step(m, idx, cache, 0, targets=idx) is None
        monkeypatch.setenv("TINYLM_KERNELS", "gpu")
        assert D.gpt_step(m, idx, cache, 0) is None
        monkeypatch.delenv("TINYLM_KERNELS")
        with pytest.raises(ValueError, match="do not fit"):
            D.gpt_step(m, idx, cache, 12)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_greedy_generation_batch_8_equals_rows_alone(kind):
    """Batch 8 through the fast step gives each row the tokens it gets alone (greedy)."""
    m = _model(kind)
    prompts = np.random.default_rng(6).integers(0, 23, (8, 4))
    together = m.generate(prompts, 6, temperature=0.0)
    for r in range(8):
        np.testing.assert_array_equal(together[r], m.generate(prompts[r], 6, temperature=0.0))
