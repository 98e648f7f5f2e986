"""Hugging Face GPT-2 layout: ``GPT.from_hf`` / ``save_hf``.

Each test writes its own GPT-2-layout directory (random small weights, written with
``safetensors.numpy`` in HF's tensor names, with and without the ``transformer.`` prefix, with
the ``attn.bias``/``attn.masked_bias`` mask buffers older checkpoints carry) under tmp_path, so
no download is needed. Oracles, in order of independence:

- a GPT-2 forward written here in plain NumPy from the paper's equations (tanh GELU, LayerNorm
  eps 1e-5, tied head), in float64: tinylm's logits on the loaded weights must match it;
- the round trip: tensors written by ``save_hf`` equal the ones loaded, and so do the logits;
- Hugging Face's ``GPT2LMHeadModel`` on the same weights, both directions (loads what tinylm
  wrote; tinylm loads what it wrote), only when ``transformers`` and ``torch`` are importable.

Leaves out: float16/bfloat16 checkpoints (NumPy has no bfloat16), sharded checkpoints.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("safetensors")
from safetensors.numpy import load_file, save_file  # noqa: E402

from tinylm.models import GPT  # noqa: E402

L, NH, C, NPOS, V = 2, 2, 16, 8, 40  # small enough to run in well under a second


def hf_config(**over) -> dict:
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": L, "n_head": NH, "n_embd": C,
           "n_positions": NPOS, "n_ctx": NPOS, "vocab_size": V, "activation_function": "gelu_new",
           "layer_norm_epsilon": 1e-5}
    cfg.update(over)
    return cfg


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2's tensors (no prefix), float32. Scales well above GPT-2's 0.02 init and LayerNorm
    weights/biases away from 1/0 so that every tensor visibly moves the logits (a swapped or
    transposed tensor would not hide behind a near-identity)."""
    rng = np.random.default_rng(seed)

    def n(*shape, std=0.3, mean=0.0):
        return (mean + std * rng.standard_normal(shape)).astype(np.float32)

    w = {"wte.weight": n(V, C, std=0.5), "wpe.weight": n(NPOS, C, std=0.3)}
    for i in range(L):
        p = f"h.{i}."
        w |= {p + "ln_1.weight": n(C, mean=1.0, std=0.2), p + "ln_1.bias": n(C, std=0.1),
              p + "attn.c_attn.weight": n(C, 3 * C), p + "attn.c_attn.bias": n(3 * C, std=0.1),
              p + "attn.c_proj.weight": n(C, C, std=0.2), p + "attn.c_proj.bias": n(C, std=0.1),
              p + "ln_2.weight": n(C, mean=1.0, std=0.2), p + "ln_2.bias": n(C, std=0.1),
              p + "mlp.c_fc.weight": n(C, 4 * C, std=0.2), p + "mlp.c_fc.bias": n(4 * C, std=0.1),
              p + "mlp.c_proj.weight": n(4 * C, C, std=0.1), p + "mlp.c_proj.bias": n(C, std=0.1)}
    w |= {"ln_f.weight": n(C, mean=1.0, std=0.2), "ln_f.bias": n(C, std=0.1)}
    return w


def write_hf_dir(path, weights, prefix: str = "", buffers: bool = True, lm_head: bool = False, config=None):
    """A GPT-2 checkpoint directory as HF writes it: config.json + model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + k: v for k, v in weights.items()}
    if buffers:  # older transformers saved the causal mask and its fill value as tensors
        for i in range(L):
            tensors[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((NPOS, NPOS), np.float32))[None, None]
            tensors[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    if lm_head:
        tensors["lm_head.weight"] = weights["wte.weight"].copy()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config() if config is None else config), encoding="utf-8")
    return path


def gpt2_reference_logits(w: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """GPT-2's forward in float64 NumPy, written from the equations, for ids (B, T) -> (B, T, V)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    B, T = ids.shape
    hs = C // NH

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance, as GPT-2
        return (x - mu) / np.sqrt(var + 1e-5) * g + b

    def gelu(x):  # GPT-2's tanh approximation ("gelu_new")
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

    x = w["wte.weight"][ids] + w["wpe.weight"][:T]
    mask = np.tril(np.ones((T, T), bool))
    for i in range(L):
        p = f"h.{i}."
        qkv = ln(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"]) @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = (a.reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, axis=-1))
        s = np.where(mask, q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs), -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        y = (a @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        h = gelu(ln(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"]) @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        x = x + h @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    return ln(x, w["ln_f.weight"], w["ln_f.bias"]) @ w["wte.weight"].T


IDS = np.random.default_rng(1).integers(0, V, (3, NPOS))


def logits_of(model: GPT, ids=IDS) -> np.ndarray:
    return model(ids)[0].data


# ---- loading --------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "transformer."])
@pytest.mark.parametrize("buffers", [True, False])
def test_from_hf_loads_every_tensor_and_matches_reference_forward(tmp_path, prefix, buffers):
    w = random_weights()
    model = GPT.from_hf(write_hf_dir(tmp_path / "hf", w, prefix=prefix, buffers=buffers, lm_head=bool(prefix)))
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (L, NH, C, NPOS, V)
    state = model.state_dict()
    assert sorted(state) == sorted(w)
    for k in w:
        np.testing.assert_array_equal(state[k], w[k], err_msg=k)
    ref = gpt2_reference_logits(w, IDS)
    # float32 forward against a float64 reference on logits of size ~10: 1e-4 relative is ~100
    # float32 ulps, loose enough for reassociated sums, far below any layout mistake (which
    # moves logits by O(1))
    np.testing.assert_allclose(logits_of(model), ref, rtol=1e-4, atol=1e-4)
    assert np.abs(ref).max() > 1.0  # the weights are large enough that the check has teeth


def test_cached_generation_runs_on_loaded_weights(tmp_path):
    """A loaded model is a full GPT: greedy generation with the KV cache agrees with the
    reference forward's argmax on the prompt's last position."""
    w = random_weights(3)
    model = GPT.from_hf(write_hf_dir(tmp_path / "hf", w))
    prompt = IDS[:1, :5]
    out = model.generate(prompt, 1, temperature=0.0)
    assert out[0, -1] == gpt2_reference_logits(w, prompt)[0, -1].argmax()


# ---- round trip -----------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_save_hf_round_trips_tensors_and_logits(tmp_path, prefix):
    w = random_weights(2)
    m1 = GPT.from_hf(write_hf_dir(tmp_path / "a", w, prefix=prefix))
    m1.save_hf(tmp_path / "b")
    saved = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert sorted(saved) == sorted(w)  # HF's names, no buffers, no separate lm_head
    for k in w:
        assert saved[k].dtype == np.float32
        np.testing.assert_array_equal(saved[k], w[k], err_msg=k)
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["n_positions"], cfg["vocab_size"]) == (L, NH, C, NPOS, V)
    assert cfg["model_type"] == "gpt2" and cfg["activation_function"] == "gelu_new"
    m2 = GPT.from_hf(tmp_path / "b")
    np.testing.assert_array_equal(logits_of(m2), logits_of(m1))


def test_save_hf_of_a_trained_model_round_trips(tmp_path):
    """A model built by tinylm (not loaded) saves and reloads to the same logits."""
    from tinylm.models import GPTConfig

    m1 = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=11), seed=5)
    m1.save_hf(tmp_path / "m")
    m2 = GPT.from_hf(tmp_path / "m")
    ids = np.array([[1, 2, 3, 10]])
    np.testing.assert_array_equal(logits_of(m2, ids), logits_of(m1, ids))


def test_save_hf_rejects_a_model_without_biases(tmp_path):
    from tinylm.models import GPTConfig

    m = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=4, block_size=4, vocab_size=5, bias=False))
    with pytest.raises(ValueError, match="bias"):
        m.save_hf(tmp_path / "m")


# ---- malformed directories: the error names the file and the key ------------------------------
def test_missing_config_json(tmp_path):
    d = write_hf_dir(tmp_path / "hf", random_weights())
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_hf(d)


def test_missing_safetensors(tmp_path):
    d = write_hf_dir(tmp_path / "hf", random_weights())
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_hf(d)


def test_config_not_json(tmp_path):
    d = write_hf_dir(tmp_path / "hf", random_weights())
    (d / "config.json").write_text("{n_layer: 2", encoding="utf-8")
    with pytest.raises(ValueError, match=r"config\.json.*JSON"):
        GPT.from_hf(d)


@pytest.mark.parametrize("field, value", [("n_head", "two"), ("n_layer", 0), ("n_embd", 1.5),
                                          ("vocab_size", None), ("n_positions", True)])
def test_config_bad_field(tmp_path, field, value):
    d = write_hf_dir(tmp_path / "hf", random_weights(), config=hf_config(**{field: value}))
    with pytest.raises(ValueError, match=rf"config\.json.*{field}"):
        GPT.from_hf(d)


def test_config_missing_field(tmp_path):
    cfg = hf_config()
    del cfg["n_embd"]
    d = write_hf_dir(tmp_path / "hf", random_weights(), config=cfg)
    with pytest.raises(ValueError, match=r"config\.json.*n_embd"):
        GPT.from_hf(d)


@pytest.mark.parametrize("over, word", [({"model_type": "llama"}, "model_type"),
                                        ({"activation_function": "relu"}, "activation_function"),
                                        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon")])
def test_config_other_architecture(tmp_path, over, word):
    d = write_hf_dir(tmp_path / "hf", random_weights(), config=hf_config(**over))
    with pytest.raises(ValueError, match=word):
        GPT.from_hf(d)


def test_config_heads_do_not_divide_width(tmp_path):
    d = write_hf_dir(tmp_path / "hf", random_weights(), config=hf_config(n_head=3))
    with pytest.raises(ValueError, match=r"config\.json.*n_head"):
        GPT.from_hf(d)


def test_wrong_tensor_shape(tmp_path):
    w = random_weights()
    w["h.1.attn.c_attn.weight"] = np.ascontiguousarray(w["h.1.attn.c_attn.weight"].T)  # PyTorch Linear's layout
    d = write_hf_dir(tmp_path / "hf", w, prefix="transformer.")
    with pytest.raises(ValueError, match=r"model\.safetensors.*h\.1\.attn\.c_attn\.weight.*\(48, 16\)"):
        GPT.from_hf(d)


def test_shapes_disagree_with_config(tmp_path):
    d = write_hf_dir(tmp_path / "hf", random_weights(), config=hf_config(vocab_size=V + 1))
    with pytest.raises(ValueError, match=r"wte\.weight"):
        GPT.from_hf(d)


def test_missing_tensor(tmp_path):
    w = random_weights()
    del w["ln_f.bias"]
    d = write_hf_dir(tmp_path / "hf", w)
    with pytest.raises(ValueError, match=r"model\.safetensors.*missing.*ln_f\.bias"):
        GPT.from_hf(d)


def test_more_layers_than_config(tmp_path):
    d = write_hf_dir(tmp_path / "hf", random_weights(), config=hf_config(n_layer=1))
    with pytest.raises(ValueError, match=r"unexpected.*h\.1\."):
        GPT.from_hf(d)


def test_integer_tensor(tmp_path):
    w = random_weights()
    w["wpe.weight"] = w["wpe.weight"].astype(np.int32)
    d = write_hf_dir(tmp_path / "hf", w)
    with pytest.raises(ValueError, match=r"wpe\.weight.*dtype"):
        GPT.from_hf(d)


def test_untied_lm_head_is_refused(tmp_path):
    w = random_weights()
    d = write_hf_dir(tmp_path / "hf", w, prefix="transformer.", lm_head=True)
    t = load_file(str(d / "model.safetensors"))
    t["lm_head.weight"] = t["lm_head.weight"] + 1.0
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        GPT.from_hf(d)


def test_truncated_safetensors(tmp_path):
    d = write_hf_dir(tmp_path / "hf", random_weights())
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        GPT.from_hf(d)


# ---- Hugging Face transformers as the reference (optional) ------------------------------------
def _hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return torch, transformers


def test_transformers_loads_what_tinylm_saved(tmp_path):
    torch, transformers = _hf()
    w = random_weights(4)
    ours = GPT.from_hf(write_hf_dir(tmp_path / "hf", w, prefix="transformer.", lm_head=True))
    ours.save_hf(tmp_path / "saved")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "saved"), attn_implementation="eager").eval()
    # every tensor arrived (HF would otherwise have initialised it at random, silently)
    sd = {k.removeprefix("transformer."): v.detach().numpy() for k, v in theirs.state_dict().items()}
    for k in w:
        np.testing.assert_array_equal(sd[k], w[k], err_msg=k)
    np.testing.assert_array_equal(sd["lm_head.weight"], w["wte.weight"])
    with torch.no_grad():
        out = theirs(torch.from_numpy(IDS), labels=torch.from_numpy(IDS))
    # both float32; the same math in a different order: agree to ~1e-5 on logits of size ~10
    np.testing.assert_allclose(logits_of(ours), out.logits.numpy(), rtol=1e-4, atol=1e-4)
    # HF's loss shifts labels inside: position t predicts token t+1
    _, loss = ours(IDS[:, :-1], IDS[:, 1:])
    assert abs(loss.item() - out.loss.item()) < 1e-4


def test_tinylm_loads_what_transformers_saved(tmp_path):
    torch, transformers = _hf()
    cfg = transformers.GPT2Config(n_layer=L, n_head=NH, n_embd=C, n_positions=NPOS, vocab_size=V,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # move every tensor off its init (LayerNorms are 1 and 0 there)
        for p in theirs.parameters():
            p.add_(0.2 * torch.randn_like(p))
    theirs.save_pretrained(str(tmp_path / "hf"))
    ours = GPT.from_hf(tmp_path / "hf")
    with torch.no_grad():
        ref = theirs(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(logits_of(ours), ref, rtol=1e-4, atol=1e-4)
