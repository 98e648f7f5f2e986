"""Models. ``GPT`` and its ``GPTConfig``: the GPT-2 architecture."""
from tinylm.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
