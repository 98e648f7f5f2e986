"""The second half's foundations: one forward for training and generation (GPT and Llama),
the model registry and tinylm.load, the objective-driven trainer and the parameter store,
exact resume for both models, and leaves freed by reference counting alone."""
import gc
import weakref
from dataclasses import replace

import numpy as np
import pytest

import tinylm
from tinylm import F, gradcheck
from tinylm.models import GPT, GPTConfig, Llama, LlamaConfig, build_model, from_hf, model_types, save_hf
from tinylm.optim import AdamW, ParamStore, Schedule
from tinylm.train import NextToken, Objective, TrainConfig, Trainer, train

GPT_TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=23)
LLAMA_TINY = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=16, block_size=12, vocab_size=23)


def tiny(kind, **kw):
    if kind == "gpt":
        return GPT(GPTConfig(**{**GPT_TINY, **kw}))
    return Llama(LlamaConfig(**{**LLAMA_TINY, **kw}))


KINDS = ["gpt", "llama", "llama-mha", "llama-tied"]


def make(kind, **kw):
    if kind == "llama-mha":
        return tiny("llama", n_kv_head=4, **kw)
    if kind == "llama-tied":
        return tiny("llama", tie_embeddings=True, **kw)
    return tiny(kind, **kw)


def test_registry_knows_both_models():
    assert model_types() == ["gpt", "llama"]
    m = build_model("llama", LLAMA_TINY)
    assert isinstance(m, Llama) and m.model_type == "llama" and m.config.n_kv_head == 2


@pytest.mark.parametrize("kind", KINDS)
def test_cached_forward_equals_uncached_logits(kind):
    """Prefill 5 tokens, then one token at a time: each step's logits equal the uncached
    forward's last row over the whole sequence (float32: same products, other summation
    lengths; 1e-5 is a few ulps of these O(1) logits)."""
    m = make(kind)
    rng = np.random.default_rng(2)
    seq = rng.integers(0, 23, (2, 5))
    cache = m.new_cache(2)
    with tinylm.no_grad():
        got = m(seq, cache=cache)[0].numpy()
        np.testing.assert_allclose(got, m(seq)[0].numpy(), rtol=1e-5, atol=1e-5)
        for _ in range(7):
            nxt = rng.integers(0, 23, (2, 1))
            seq = np.concatenate([seq, nxt], axis=1)
            step = m(nxt, cache=cache)[0].numpy()[:, -1]
            np.testing.assert_allclose(step, m(seq)[0].numpy()[:, -1], rtol=1e-5, atol=1e-5)
    assert cache.pos == 12


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=0.9, top_k=5), dict(temperature=1.2, top_p=0.8)])
def test_cached_generation_equals_uncached_tokens(kind, kw):
    m = make(kind)
    prompt = np.random.default_rng(3).integers(0, 23, (2, 4))
    a = m.generate(prompt, 8, seed=7, use_cache=True, **kw)
    b = m.generate(prompt, 8, seed=7, use_cache=False, **kw)
    np.testing.assert_array_equal(a, b)


def test_cache_is_for_inference_only():
    m = make("llama")
    with pytest.raises(RuntimeError, match="inference"):
        m(np.zeros((1, 2), np.int64), cache=m.new_cache(1))
    with tinylm.no_grad(), pytest.raises(ValueError, match="block_size"):
        m(np.zeros((1, 13), np.int64), cache=m.new_cache(1))


def test_llama_parameter_names_and_count():
    m = make("llama")
    names = [n for n, _ in m.named_parameters()]
    assert names[0] == "embed_tokens.weight" and names[-1] == "lm_head.weight"
    for n in ("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight", "layers.1.mlp.gate_proj.weight",
              "layers.1.mlp.down_proj.weight", "layers.0.input_layernorm.weight", "norm.weight"):
        assert n in names
    C, V, hs, Fh = 16, 23, 4, 64  # ffn: 8/3 * 16 = 42.7 -> 64 (multiple of 32)
    assert m.layers[0].self_attn.k_proj.weight.shape == (2 * hs, C)  # (out, in), 2 kv heads
    per_block = C * C + 2 * (2 * hs * C) + C * C + 3 * C * Fh + 2 * C
    assert m.num_params() == V * C + 2 * per_block + C + V * C
    assert make("llama-tied").num_params() == m.num_params() - V * C


def test_llama_loss_gradcheck_float64():
    m = make("llama", dtype="float64", n_embd=8, vocab_size=11, block_size=6, n_head=2, n_kv_head=1)
    idx = np.random.default_rng(1).integers(0, 11, (2, 6))

    def loss_of(*ps):
        return m(idx, np.roll(idx, -1, axis=1))[1]

    assert gradcheck(loss_of, m.parameters(), n_directions=3, full_jacobian_limit=0)


def test_rope_interleaved_model_is_a_channel_permutation():
    """A Llama with interleaved RoPE pairs gives the half-split model's logits once each head's
    q and k output channels are permuted so that pair (i, i + hs/2) becomes (2i, 2i + 1)."""
    a = make("llama", dtype="float64")
    b = make("llama", dtype="float64", rope_interleaved=True)
    hs = 4
    perm = np.array([j for i in range(hs // 2) for j in (i, i + hs // 2)])  # new channel c reads old perm[c]
    for name, p in b.named_parameters():
        w = dict(a.named_parameters())[name].data.copy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            nh = w.shape[0] // hs
            w = w.reshape(nh, hs, -1)[:, perm].reshape(nh * hs, -1)
        p.data[...] = w
    idx = np.random.default_rng(0).integers(0, 23, (2, 12))
    np.testing.assert_allclose(b(idx)[0].numpy(), a(idx)[0].numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_hf_layout_round_trip(kind, tmp_path):
    m = make(kind)
    save_hf(m, tmp_path / "hf")
    back = from_hf(tmp_path / "hf")
    assert type(back) is type(m)
    idx = np.random.default_rng(0).integers(0, 23, (1, 12))
    np.testing.assert_array_equal(back(idx)[0].numpy(), m(idx)[0].numpy())
    other = Llama if kind == "gpt" else GPT
    with pytest.raises(ValueError, match="model_type"):
        other.from_hf(tmp_path / "hf")


class Memorise(Objective):
    """The objective API on its own: the same batch every step."""
    name = "memorise"

    def loss(self, model, batch):
        x, y = batch
        loss = model(x, y)[1]
        return loss, {"tokens": float(x.size)}


class FixedBatch:
    tokens_per_batch = 24

    def __init__(self, batch):
        self.batch = batch

    def next(self):
        return self.batch

    def state(self):
        return {}

    def set_state(self, s):
        pass


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_objective_api_overfits_one_batch(kind, tmp_path):
    from tinylm.tokenizer import BPETokenizer

    m = make(kind)
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 23, (2, 13))
    cfg = replace(TrainConfig(), lr=3e-2, min_lr=3e-2, warmup_steps=0, max_steps=150, eval_interval=1000,
                  log_interval=50, progress=False, weight_decay=0.0)
    tok = BPETokenizer()
    res = Trainer(m, Memorise(), FixedBatch((seq[:, :-1], seq[:, 1:])), cfg, tmp_path, tok).run()
    assert res["train_losses"][0] > 2.5 and res["train_losses"][-1] < 0.05
    assert (tmp_path / "checkpoint" / "state.json").is_file()


def test_param_store_views_and_buffers():
    m = make("gpt")
    store = ParamStore.for_model(m, 0.1)
    assert store.numel() == m.num_params()
    g0 = store.groups[0]
    p = g0.params[1]
    off = g0.offsets[1]
    assert np.shares_memory(p.data, g0.p) and np.shares_memory(p.grad, g0.g)
    np.testing.assert_array_equal(g0.p[off:off + p.size], p.data.reshape(-1))
    opt = AdamW(store, lr=1e-3)
    assert opt.store is store and set(store.nbytes()) == {"params", "grads", "m", "v"}
    assert store.nbytes()["m"] == store.nbytes()["params"]
    frozen = make("gpt")
    frozen.wte.weight.requires_grad = False
    assert ParamStore.for_model(frozen).numel() == frozen.num_params() - frozen.wte.weight.size


def test_schedule_extension_is_continuous():
    s = Schedule(1e-2, 1e-3, 10, 100)
    assert s(99) > s(100) == 1e-3
    at = 80
    before = s(at)
    s.extend(at, 300)
    assert s(at) == pytest.approx(before) and s(300) == pytest.approx(1e-3) and s(150) < before
    back = Schedule.from_state(s.state())
    assert [back(i) for i in range(0, 320, 7)] == [s(i) for i in range(0, 320, 7)]


def test_leaves_are_freed_without_the_cyclic_gc():
    """A fresh leaf per iteration, dropped after backward: with the cyclic GC off it dies at
    once (a weakref to it is dead) and memory does not grow."""
    import tracemalloc

    x0 = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    t0 = np.random.default_rng(1).integers(0, 256, 64)
    gc.disable()
    try:
        tracemalloc.start()
        for i in range(30):
            x = tinylm.tensor(x0, requires_grad=True)
            (F.gelu(x).sum() + F.cross_entropy(x, t0)).backward()
            ref = weakref.ref(x)
            assert x.grad is not None
            del x
            assert ref() is None
            if i == 5:
                base = tracemalloc.get_traced_memory()[0]
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
    finally:
        gc.enable()
    assert grown < 2 * x0.nbytes, grown  # one live iteration's arrays, not 25 of them


def _corpus(path):
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over lazy dog and cat runs to a red house while birds sing".split()
    path.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        (path / f"d{i}.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(20)) + "\n")
    return path


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_exact_resume_for_both_models(model, tmp_path):
    corpus = _corpus(tmp_path / "c")
    cfg = TrainConfig(data=[str(corpus)], vocab_size=300, model=model, n_layer=1, n_head=2, n_embd=16, block_size=16,
                      batch_size=4, max_steps=8, warmup_steps=2, eval_interval=3, eval_batches=1, log_interval=1,
                      lr=1e-2, min_lr=1e-3, progress=False, sample_tokens=0, grad_accum=2)
    straight = train(replace(cfg, out_dir=str(tmp_path / "a")))
    train(replace(cfg, out_dir=str(tmp_path / "b")), max_steps=3)
    resumed = train(replace(cfg, out_dir=str(tmp_path / "b")), resume=True)
    np.testing.assert_array_equal(resumed["train_losses"], straight["train_losses"][3:])
    m, _ = tinylm.load(tmp_path / "b" / "checkpoint")
    assert m.model_type == model
    for (n, p), (_, q) in zip(m.named_parameters(), straight["model"].named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=n)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_rows_at_different_positions_decode_as_if_alone(kind):
    """Batched decoding (a server's slots): rows prefilled alone into their rows of one cache, at
    different lengths, then stepped together with a start per row, give each row's own logits."""
    m = make(kind)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 23, n) for n in (3, 7, 5)]
    cache = m.new_cache(3)
    with tinylm.no_grad():
        for r, p in enumerate(prompts):
            m(p[None], cache=cache.row(r), start=0)
        seqs = [list(p) for p in prompts]
        for _ in range(4):
            nxt = rng.integers(0, 23, (3, 1))
            start = np.array([len(s) for s in seqs])
            got = m(nxt, cache=cache, start=start)[0].numpy()[:, -1]
            for r in range(3):
                seqs[r].append(int(nxt[r, 0]))
                alone = m(np.array(seqs[r])[None])[0].numpy()[0, -1]
                np.testing.assert_allclose(got[r], alone, rtol=1e-5, atol=1e-5)


def test_cli_trains_a_llama_and_samples_it(tmp_path):
    import subprocess
    import sys

    corpus = _corpus(tmp_path / "c")
    run = lambda *a: subprocess.run([sys.executable, "-m", "tinylm", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=600, cwd=tmp_path)
    # overrides before, between and after the flags (--data takes several paths)
    r = run("train", "model=llama", "--data", str(corpus), "n_kv_head=1", "--out", str(tmp_path / "run"),
            "--max-steps", "4", "vocab_size=300", "n_layer=1", "n_embd=16", "n_head=2", "block_size=16",
            "batch_size=4", "eval_interval=2", "eval_batches=1", "sample_tokens=0", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "model: llama" in r.stdout and "1 kv heads" in r.stdout
    r = run("sample", "--ckpt", str(tmp_path / "run" / "checkpoint"), "--prompt", "the", "--max-new-tokens", "8",
            "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("the"), r.stderr
    m, _ = tinylm.load(tmp_path / "run" / "checkpoint")
    assert isinstance(m, Llama) and m.config.n_kv_head == 1


def test_leaf_gradients_never_alias_each_other_or_the_callers_array():
    """The engine hands a fresh gradient to a leaf without copying it; arrays shared between
    inputs (Add gives both the same dout) or given by the caller are still copied."""
    a, b = (tinylm.tensor(np.ones(4), requires_grad=True) for _ in range(2))
    (a + b).backward(np.full(4, 2.0))
    assert a.grad is not b.grad and not np.shares_memory(a.grad, b.grad)
    a.grad += 1
    np.testing.assert_array_equal(b.grad, np.full(4, 2.0))
    g = np.full(4, 3.0)
    c = tinylm.tensor(np.ones(4), requires_grad=True)
    c.backward(g)
    assert not np.shares_memory(c.grad, g)
    x = tinylm.tensor(np.arange(4.0), requires_grad=True)
    (x * x + x).sum().backward()
    np.testing.assert_array_equal(x.grad, 2 * np.arange(4.0) + 1)
