"""What every tinylm language model shares, whatever its architecture.

A model is a Module with a ``config`` (a dataclass with ``block_size`` and ``vocab_size``), a
``model_type`` (its key in tinylm.models.registry), and one forward:

    forward(idx, targets=None, cache=None, start=None, ignore_index=-100, return_logits=True,
            head=None) -> (logits, loss)

``idx`` (B, T) integer ids; with ``targets`` (B, T) the mean cross-entropy (``ignore_index``
rows left out); with ``return_logits=False`` as well, (None, loss) from the fused LM head +
cross-entropy, which never makes the (B, T, V) logits (what training calls; also
``model.loss(idx, targets)``); with ``head``, a function (x, w) -> (logits, loss) of the final
hidden states and the head's weight that replaces the LM head (``model.sequence_logprobs``, the
fused per-row log-probs DPO trains with); with ``cache`` (a KVCache from ``new_cache``) the T new tokens
sit at positions ``start..start+T-1`` (default: ``cache.pos``) and attend over the cached ones.
Training and generation run the same block code; generation itself lives in tinylm.generate,
written once for every model.
"""
from __future__ import annotations

import numpy as np

from tinylm.backend import to_device, xp_of
from tinylm.nn import Module
from tinylm.tensor import Tensor


class ConfigFromDict:
    """``from_dict`` for a model's config dataclass: an unknown key is an error that names it."""

    @classmethod
    def from_dict(cls, d: dict):
        from dataclasses import fields  # noqa: PLC0415

        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}")
        return cls(**d)


class LanguageModel(Module):
    model_type = "?"

    def __call__(self, idx, targets=None, cache=None, start=None, ignore_index: int = -100,
                 return_logits: bool = True, head=None):
        if head is not None:
            return self.forward(idx, targets, cache, start, ignore_index, head=head)
        if return_logits:  # the keyword only when it matters: wrappers of forward keep working
            return self.forward(idx, targets, cache, start, ignore_index)
        return self.forward(idx, targets, cache, start, ignore_index, return_logits=False)

    def loss(self, idx, targets, ignore_index: int = -100):
        """The mean cross-entropy alone, through the fused LM head + cross-entropy (the (B, T, V)
        logits are never made: kernels/head_ce.py): what training calls."""
        return self(idx, targets, ignore_index=ignore_index, return_logits=False)[1]

    def token_logprobs(self, idx, targets, ignore_index: int = -100):
        """(B, T) float64 Tensor: log p(targets) per position, 0 where ignored, through the fused
        LM head (tinylm/posttrain/logprobs.py), without the (B, T, V) logits: what GRPO trains with."""
        from tinylm.posttrain.logprobs import head_token_logprobs  # noqa: PLC0415

        return self(idx, head=lambda x, w: (None, head_token_logprobs(x, w, targets, ignore_index)))[1]

    def sequence_logprobs(self, idx, targets, ignore_index: int = -100, average: bool = False):
        """(B,) float64 Tensor: the sum (``average``: mean) of log p(targets) over each row's
        kept tokens, through the fused LM head (tinylm/posttrain/logprobs.py): what DPO trains
        and caches its reference with, without the (B, T, V) logits."""
        from tinylm.posttrain.logprobs import head_sequence_logprobs  # noqa: PLC0415

        return self(idx, head=lambda x, w: (None, head_sequence_logprobs(x, w, targets, ignore_index, average)))[1]

    @staticmethod
    def _head(x, w, targets, ignore_index: int, return_logits: bool, head=None):
        """(logits, loss) from the final hidden states x (B, T, C) and the head's weight w (V, C).
        With targets and ``return_logits=False``: (None, loss) from the fused head + loss. With
        ``head``, a function of (x, w) that replaces the LM head: what it returns."""
        from tinylm import functional as F  # noqa: PLC0415

        if head is not None:
            return head(x, w)
        if targets is not None and not return_logits:
            return None, F.head_cross_entropy(x, w, targets, ignore_index)
        logits = F.linear_t(x, w)  # (B, T, C) @ (V, C)^T
        return logits, None if targets is None else F.cross_entropy(logits, targets, ignore_index)

    # ---- helpers for forward ----------------------------------------------------------------
    def _check_input(self, idx, cache, start):
        """idx as an array (B, T) and the start position, checked against the context."""
        if isinstance(idx, Tensor):
            idx = idx.data
        if not hasattr(idx, "ndim"):
            idx = np.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"{type(self).__name__}: idx must be (B, T), got shape {idx.shape}")
        T = idx.shape[1]
        if cache is None:
            if start is not None and np.any(np.asarray(start) != 0):
                raise ValueError(f"{type(self).__name__}: start={start} needs a cache")
            start = 0
        elif start is None:
            start = cache.pos
        bs = self.config.block_size
        if not isinstance(start, (int, np.integer)):  # one position per row (batched decoding)
            start = np.asarray(start, dtype=np.int64)
            if start.shape != (idx.shape[0],) or (start < 0).any():
                raise ValueError(f"{type(self).__name__}: per-row start must be ({idx.shape[0]},) non-negative ints")
            if int(start.max()) + T > bs:
                raise ValueError(f"{type(self).__name__}: positions up to {int(start.max()) + T - 1} are longer than "
                                 f"block_size={bs}")
            return self._dev(idx), start
        if start + T > bs:
            what = f"sequence of length {T}" if start == 0 else f"positions {start}..{start + T - 1}"
            raise ValueError(f"{type(self).__name__}: {what} is longer than block_size={bs}")
        return self._dev(idx), int(start)

    @staticmethod
    def _positions(start, T: int):
        """Positions of the T new tokens: (T,) for one start, (B, T) for a start per row."""
        if isinstance(start, (int, np.integer)):
            return np.arange(start, start + T)
        return start[:, None] + np.arange(T)[None, :]

    @staticmethod
    def _advance(cache, start, T: int) -> None:
        if cache is not None:
            cache.pos = start + T if isinstance(start, (int, np.integer)) else int(start.max()) + T

    def _dev(self, a):
        return to_device(a, "gpu") if self.on_gpu else a

    def _any_weight(self):
        """One parameter's array (its type says the device). Subclasses return an attribute:
        walking the module tree on every generated token would cost more than the token."""
        return self.parameters()[0].data

    @property
    def on_gpu(self) -> bool:
        return not isinstance(self._any_weight(), np.ndarray)

    @property
    def xp(self):
        return xp_of(self._any_weight())

    # ---- generation (tinylm.generate, for every model) --------------------------------------
    def generate_iter(self, idx, max_new_tokens: int, **kw):
        """Yield the next token of each row (B,) one step at a time (see tinylm.generate)."""
        from tinylm.generate import generate_iter  # noqa: PLC0415

        return generate_iter(self, idx, max_new_tokens, **kw)

    def generate(self, idx, max_new_tokens: int, **kw) -> np.ndarray:
        """Prompt ids (B, T) or (T,) -> (B, T + new) ids (see tinylm.generate)."""
        from tinylm.generate import generate  # noqa: PLC0415

        return generate(self, idx, max_new_tokens, **kw)

    # ---- Hugging Face layout ----------------------------------------------------------------
    @classmethod
    def from_hf(cls, path):
        """Load a Hugging Face directory (config.json + model.safetensors) of this architecture."""
        from tinylm.models.hf import from_hf  # noqa: PLC0415

        return from_hf(path, expect=cls.model_type)

    def save_hf(self, path) -> None:
        """Write config.json + model.safetensors in Hugging Face's layout for this architecture."""
        from tinylm.models.hf import save_hf  # noqa: PLC0415

        save_hf(self, path)

    def config_dict(self) -> dict:
        from dataclasses import asdict  # noqa: PLC0415

        return asdict(self.config)
