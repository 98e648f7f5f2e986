"""Hugging Face GPT-2 checkpoints: ``config.json`` + ``model.safetensors``.

GPT-2's Conv1D stores weights as (in, out), tinylm's layout, so loading is a copy by name. The
files may name tensors with or without the ``transformer.`` prefix (GPT2Model vs
GPT2LMHeadModel); the attention-mask buffers (``attn.bias``, ``attn.masked_bias``) are not
parameters and are skipped; an ``lm_head.weight`` must equal ``wte.weight`` (tinylm ties them).

Every problem with a file is reported with the file and the key: a missing file, a config
field missing or of the wrong type, an unexpected or missing tensor, a shape that disagrees.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tinylm._files import read_json

SKIP_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not found (a Hugging Face GPT-2 directory has config.json and model.safetensors)")
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object at the top level")
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{cfg_path}: model_type is {cfg.get('model_type')!r}, only 'gpt2' is supported")
    out = {}
    for ours, theirs in (("n_layer", "n_layer"), ("n_head", "n_head"), ("n_embd", "n_embd"),
                         ("block_size", "n_positions"), ("vocab_size", "vocab_size")):
        v = cfg.get(theirs)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{cfg_path}: field {theirs!r} must be a positive integer, got {v!r}")
        out[ours] = v
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{cfg_path}: activation_function {act!r} is not GPT-2's tanh GELU ('gelu_new')")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if abs(float(eps) - 1e-5) > 1e-12:
        raise ValueError(f"{cfg_path}: layer_norm_epsilon {eps} differs from tinylm's 1e-5")
    return out


def load_hf(cls, path: Path):
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    from tinylm.models.gpt import GPTConfig  # noqa: PLC0415

    try:
        cfg = GPTConfig(**_read_config(path), dropout=0.0, bias=True)
    except ValueError as e:
        if str(e).startswith(str(path / "config.json")):
            raise
        raise ValueError(f"{path / 'config.json'}: {e}") from None  # e.g. n_embd not divisible by n_head
    st_path = path / "model.safetensors"
    if not st_path.is_file():
        raise FileNotFoundError(f"{st_path}: not found")
    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{st_path}: not a readable safetensors file ({e})") from None
    state, head = {}, None
    for key, arr in tensors.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name.endswith(SKIP_SUFFIXES):
            continue
        if name == "lm_head.weight":
            head = arr
            continue
        state[name] = arr
    model = cls(cfg)
    params = dict(model.named_parameters())
    unexpected = sorted(set(state) - set(params))
    missing = sorted(set(params) - set(state))
    if unexpected or missing:
        raise ValueError(f"{st_path}: tensors do not match GPT-2 with {cfg.n_layer} layers: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, p in params.items():
        a = state[name]
        if a.shape != p.shape:
            raise ValueError(f"{st_path}: tensor {name!r} has shape {a.shape}, config.json implies {p.shape}")
        if a.dtype.kind != "f":
            raise ValueError(f"{st_path}: tensor {name!r} has dtype {a.dtype}, expected floating point")
        p.data[...] = a.astype(p.dtype)
    if head is not None and not np.array_equal(head.astype(np.float32), model.wte.weight.data.astype(np.float32)):
        raise ValueError(f"{st_path}: lm_head.weight differs from wte.weight; tinylm's GPT ties them")
    return model


def save_hf(model, path: Path) -> None:
    from safetensors.numpy import save_file  # noqa: PLC0415

    c = model.config
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
        "n_ctx": c.block_size, "vocab_size": c.vocab_size, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": 0.0,
        "initializer_range": 0.02, "tie_word_embeddings": True,
    }
    if not c.bias:
        raise ValueError("save_hf: GPT-2's layout has biases everywhere; this model was built with bias=False")
    tensors = {name: np.ascontiguousarray(a) for name, a in model.state_dict().items()}
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
