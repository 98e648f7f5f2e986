"""Models: GPT (the GPT-2 architecture) and Llama (RMSNorm, RoPE, SwiGLU, grouped-query
attention), found by name through the registry (``model_type`` in checkpoints and in Hugging
Face config.json files).

    from tinylm.models import GPT, GPTConfig, Llama, LlamaConfig, build_model, from_hf, save_hf
"""
from tinylm.models.gpt import GPT, GPTConfig
from tinylm.models.registry import build_model, model_class, model_types, register_model

register_model("gpt", GPT, GPTConfig)

try:  # Llama needs the rms_norm / rope / swiglu kernels
    from tinylm.models.llama import Llama, LlamaConfig
except ImportError:  # pragma: no cover - only while those kernels are being written
    Llama = LlamaConfig = None
else:
    register_model("llama", Llama, LlamaConfig)


def from_hf(path):
    """A GPT or a Llama from a Hugging Face directory (config.json + model.safetensors),
    according to its ``model_type``."""
    from tinylm.models.hf import from_hf as _from_hf  # noqa: PLC0415

    return _from_hf(path)


def save_hf(model, path) -> None:
    """Write ``model`` as a Hugging Face directory that ``transformers`` loads."""
    from tinylm.models.hf import save_hf as _save_hf  # noqa: PLC0415

    _save_hf(model, path)


__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig", "build_model", "from_hf", "model_class", "model_types",
           "register_model", "save_hf"]
