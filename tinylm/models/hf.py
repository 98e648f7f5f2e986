"""Hugging Face checkpoints: ``config.json`` + ``model.safetensors``, for GPT-2 and Llama.

``from_hf(path)`` reads ``model_type`` from config.json and builds the matching tinylm model
(``gpt2`` -> GPT, ``llama`` -> Llama); ``save_hf(model, path)`` writes a directory that
``transformers`` loads (GPT2LMHeadModel, LlamaForCausalLM).

GPT-2: its Conv1D stores weights as (in, out), tinylm's layout, so loading is a copy by name.
The files may name tensors with or without the ``transformer.`` prefix (GPT2Model vs
GPT2LMHeadModel); the attention-mask buffers (``attn.bias``, ``attn.masked_bias``) are not
parameters and are skipped; an ``lm_head.weight`` must equal ``wte.weight`` (tinylm ties them).

Llama: tinylm's parameter names are Hugging Face's without the ``model.`` prefix, and its
projections keep PyTorch's (out, in) layout, so loading is a copy by name too. RoPE uses the
half-split layout (``rotate_half``), which is Hugging Face's.

Every problem with a file is reported with the file and the key: a missing file, a config
field missing or of the wrong type, an unexpected or missing tensor, a shape that disagrees.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tinylm._files import read_json

SKIP_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not found (a Hugging Face model directory has config.json and "
                                f"model.safetensors)")
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object at the top level")
    return cfg


def _int_field(cfg: dict, key: str, cfg_path: Path, default=None) -> int:
    v = cfg.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{cfg_path}: field {key!r} must be a positive integer, got {v!r}")
    return v


def _float_field(cfg: dict, key: str, cfg_path: Path, default) -> float:
    v = cfg.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        raise ValueError(f"{cfg_path}: field {key!r} must be a positive number, got {v!r}")
    return float(v)


def _gpt2_config(cfg: dict, cfg_path: Path) -> dict:
    out = {ours: _int_field(cfg, theirs, cfg_path) for ours, theirs in (
        ("n_layer", "n_layer"), ("n_head", "n_head"), ("n_embd", "n_embd"), ("block_size", "n_positions"),
        ("vocab_size", "vocab_size"))}
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{cfg_path}: activation_function {act!r} is not GPT-2's tanh GELU ('gelu_new')")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if abs(float(eps) - 1e-5) > 1e-12:
        raise ValueError(f"{cfg_path}: layer_norm_epsilon {eps} differs from tinylm's 1e-5")
    return dict(out, dropout=0.0, bias=True)


def _llama_config(cfg: dict, cfg_path: Path) -> dict:
    n_head = _int_field(cfg, "num_attention_heads", cfg_path)
    out = {
        "n_layer": _int_field(cfg, "num_hidden_layers", cfg_path),
        "n_head": n_head,
        "n_kv_head": _int_field(cfg, "num_key_value_heads", cfg_path, n_head),
        "n_embd": _int_field(cfg, "hidden_size", cfg_path),
        "ffn_hidden": _int_field(cfg, "intermediate_size", cfg_path),
        "block_size": _int_field(cfg, "max_position_embeddings", cfg_path),
        "vocab_size": _int_field(cfg, "vocab_size", cfg_path),
        "rope_theta": _float_field(cfg, "rope_theta", cfg_path, 10000.0),
        "norm_eps": _float_field(cfg, "rms_norm_eps", cfg_path, 1e-6),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{cfg_path}: hidden_act {cfg.get('hidden_act')!r}: tinylm's Llama uses SwiGLU with 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key, False):
            raise ValueError(f"{cfg_path}: {key} is true; tinylm's Llama has no biases")
    if cfg.get("rope_scaling") not in (None, {}):
        raise ValueError(f"{cfg_path}: rope_scaling {cfg.get('rope_scaling')!r} is not supported (plain RoPE only)")
    hd = cfg.get("head_dim")
    if hd is not None and hd != out["n_embd"] // n_head:
        raise ValueError(f"{cfg_path}: head_dim {hd} differs from hidden_size / num_attention_heads")
    return out


def _load_tensors(st_path: Path) -> dict:
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    if not st_path.is_file():
        raise FileNotFoundError(f"{st_path}: not found")
    try:
        return load_file(str(st_path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ValueError(f"{st_path}: not a readable safetensors file ({e})") from None


def _copy_in(model, state: dict, st_path: Path, what: str) -> None:
    params = dict(model.named_parameters())
    unexpected = sorted(set(state) - set(params))
    missing = sorted(set(params) - set(state))
    if unexpected or missing:
        raise ValueError(f"{st_path}: tensors do not match {what}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, p in params.items():
        a = state[name]
        if a.shape != p.shape:
            raise ValueError(f"{st_path}: tensor {name!r} has shape {a.shape}, config.json implies {p.shape}")
        if a.dtype.kind != "f":
            raise ValueError(f"{st_path}: tensor {name!r} has dtype {a.dtype}, expected floating point")
        p.data[...] = a.astype(p.dtype)


def from_hf(path: str | os.PathLike, expect: str | None = None):
    """A tinylm model from a Hugging Face directory, by its config's ``model_type`` (which
    must be ``expect``, a tinylm model type, when given)."""
    from tinylm.models.registry import HF_TYPES, model_class  # noqa: PLC0415

    path = Path(path)
    cfg_path = path / "config.json"
    cfg = _read_config(path)
    hf_type = cfg.get("model_type", "gpt2")
    if hf_type not in HF_TYPES:
        raise ValueError(f"{cfg_path}: model_type {hf_type!r} is not supported; tinylm reads {sorted(HF_TYPES)}")
    ours = HF_TYPES[hf_type]
    if expect is not None and ours != expect:
        theirs = [k for k, v in HF_TYPES.items() if v == expect]
        raise ValueError(f"{cfg_path}: model_type is {hf_type!r}, not {theirs[0]!r}; "
                         f"tinylm.models.from_hf loads either")
    model_cls, config_cls = model_class(ours)
    fields = _gpt2_config(cfg, cfg_path) if ours == "gpt" else _llama_config(cfg, cfg_path)
    try:
        config = config_cls(**fields)
    except ValueError as e:  # e.g. n_embd not divisible by n_head
        raise ValueError(f"{cfg_path}: {e}") from None
    st_path = path / "model.safetensors"
    tensors = _load_tensors(st_path)
    model = model_cls(config)
    if ours == "gpt":
        state, head = {}, None
        for key, arr in tensors.items():
            name = key[len("transformer."):] if key.startswith("transformer.") else key
            if name.endswith(SKIP_SUFFIXES):
                continue
            if name == "lm_head.weight":
                head = arr
                continue
            state[name] = arr
        _copy_in(model, state, st_path, f"GPT-2 with {config.n_layer} layers")
        if head is not None and not np.array_equal(head.astype(np.float32), model.wte.weight.data.astype(np.float32)):
            raise ValueError(f"{st_path}: lm_head.weight differs from wte.weight; tinylm's GPT ties them")
    else:
        state = {}
        for key, arr in tensors.items():
            name = key[len("model."):] if key.startswith("model.") else key
            if name.endswith(SKIP_SUFFIXES):
                continue
            state[name] = arr
        if config.tie_embeddings and "lm_head.weight" in state:
            head = state.pop("lm_head.weight")
            if not np.array_equal(head, state.get("embed_tokens.weight", head)):
                raise ValueError(f"{st_path}: tie_word_embeddings is true but lm_head.weight differs from embed_tokens")
        _copy_in(model, state, st_path, f"Llama with {config.n_layer} layers")
    return model.eval()


def save_hf(model, path: str | os.PathLike) -> None:
    """Write config.json + model.safetensors in Hugging Face's layout (GPT-2 or Llama)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    path = Path(path)
    c = model.config
    if model.model_type == "gpt":
        if not c.bias:
            raise ValueError("save_hf: GPT-2's layout has biases everywhere; this model was built with bias=False")
        config = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
            "n_ctx": c.block_size, "vocab_size": c.vocab_size, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": 0.0,
            "initializer_range": 0.02, "tie_word_embeddings": True,
        }
        tensors = {name: np.ascontiguousarray(a) for name, a in model.state_dict().items()}
    elif model.model_type == "llama":
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
            "hidden_size": c.n_embd, "intermediate_size": model.ffn_hidden, "max_position_embeddings": c.block_size,
            "vocab_size": c.vocab_size, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
            "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "rope_scaling": None, "head_dim": c.n_embd // c.n_head,
            "torch_dtype": "float32", "initializer_range": 0.02,
        }
        tensors = {("lm_head.weight" if name == "lm_head.weight" else "model." + name): np.ascontiguousarray(a)
                   for name, a in model.state_dict().items()}
    else:
        raise ValueError(f"save_hf: no Hugging Face layout for model type {model.model_type!r}")
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
