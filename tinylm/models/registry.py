"""Models by name: the ``model_type`` a checkpoint or a Hugging Face config.json records.

    build_model("llama", {"n_layer": 2, ...})      -> Llama(LlamaConfig(...))
    model_class("gpt") -> (GPT, GPTConfig)

Hugging Face names (``gpt2``, ``llama``) map to tinylm's (``gpt``, ``llama``) in HF_TYPES.
"""
from __future__ import annotations

_MODELS: dict[str, tuple] = {}
HF_TYPES = {"gpt2": "gpt", "llama": "llama"}


def register_model(name: str, model_cls, config_cls) -> None:
    _MODELS[name] = (model_cls, config_cls)
    model_cls.model_type = name


def _ensure_loaded() -> None:
    if not _MODELS:
        import tinylm.models  # noqa: F401, PLC0415  (registers gpt and llama)


def model_types() -> list[str]:
    _ensure_loaded()
    return sorted(_MODELS)


def model_class(name: str):
    """(model class, config class) for a model_type."""
    _ensure_loaded()
    if name not in _MODELS:
        raise ValueError(f"unknown model type {name!r}; known: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def build_model(name: str, config: dict, seed: int = 0):
    model_cls, config_cls = model_class(name)
    return model_cls(config_cls.from_dict(config), seed=seed)
