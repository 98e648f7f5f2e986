"""The three number formats of a run, and conversion between them.

    fp32  float32                      the compute format of every kernel
    bf16  uint16 (top half of f32)     8 exponent bits like fp32: same range, 8 significant bits
    fp16  float16                      5 exponent bits: max 65504, smallest subnormal 6e-8;
                                       11 significant bits

The conversions themselves are kernels (``kernels/_formats.py``: the NumPy reference and the
Numba loops, integer arithmetic on uint32 views), since the kernels convert their 16-bit
inputs too and ``kernels`` imports nothing above it. This module is the names the rest of
tinylm uses.

>>> import numpy as np
>>> b = from_f32(np.array([1.0, 1.00390625, 3.4e38], np.float32), "bf16")
>>> [hex(v) for v in b]   # 1.0; the tie 1 + 2^-8 rounds to even (1.0); 3.4e38 > max bf16 -> inf
['0x3f80', '0x3f80', '0x7f80']
"""
from __future__ import annotations

import contextlib

import numpy as np

from kernels._formats import (bf16_to_f32, f32_to_bf16, f32_to_bf16_sr, format_of, is_16bit,
                              round_to_format, to_f32)

from tinylm.amp.policy import FORMATS

_STORAGE = {"fp32": np.dtype(np.float32), "bf16": np.dtype(np.uint16), "fp16": np.dtype(np.float16)}


def storage_dtype(fmt: str) -> np.dtype:
    """The NumPy dtype an array of ``fmt`` is stored as."""
    try:
        return _STORAGE[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}") from None


def from_f32(x, fmt: str):
    """float32 -> the storage array of ``fmt`` (round to nearest even; fp16 overflow -> inf)."""
    storage_dtype(fmt)
    if fmt == "bf16":
        return f32_to_bf16(x)
    if fmt == "fp16":
        with np.errstate(over="ignore"):
            return np.asarray(x, dtype=np.float32).astype(np.float16)
    return np.asarray(x, dtype=np.float32)


def finfo(fmt: str) -> dict:
    """Largest finite value, smallest normal and machine epsilon of a format."""
    return {"fp32": {"max": 3.4028235e38, "tiny": 1.1754944e-38, "eps": 2.0 ** -23},
            "bf16": {"max": 3.3895314e38, "tiny": 1.1754944e-38, "eps": 2.0 ** -7},
            "fp16": {"max": 65504.0, "tiny": 6.1035156e-05, "eps": 2.0 ** -10}}[fmt]


def round_model(model, fmt: str):
    """Round every parameter of ``model`` to ``fmt`` in place (values of the format, kept as
    float32, as a 16-bit run's working copy): a model run "in bf16" or "in fp16" here. Returns it."""
    storage_dtype(fmt)
    if fmt != "fp32":
        for p in model.parameters():
            if getattr(p, "fmt", None) is not None:  # stored in a 16-bit format already (a store's working copy)
                if p.fmt != fmt:
                    raise ValueError(f"round_model: {fmt} asked of a parameter stored in {p.fmt}")
                continue
            if p.data.dtype != np.float32:
                raise ValueError(f"round_model: {fmt} needs a float32 model, this one is {p.data.dtype}")
            round_to_format(p.data, fmt, out=p.data)
    return model


@contextlib.contextmanager
def decoded_weights(model):
    """Inside: every parameter stored in a 16-bit format (a store's working copy) is a float32
    array of the same values; after: the 16-bit views again. Generation runs so: its KV cache
    and its one-token kernels (kernels/decode.py) are float32, and decoding the weights once
    per call beats decoding them in every op of every token."""
    params = model.parameters() if hasattr(model, "parameters") else ()  # any object with a forward generates
    swapped = [(p, p.data, p.fmt) for p in params if getattr(p, "fmt", None) is not None]
    for p, data, fmt in swapped:
        p.data, p.fmt = to_f32(data), None
    try:
        yield model
    finally:
        for p, data, fmt in swapped:
            p.data, p.fmt = data, fmt


class in_format:
    """``with in_format(model, fmt):`` the model's weights rounded to ``fmt`` inside the block
    and restored bit for bit after (a full-model reference computed in the run's format)."""

    def __init__(self, model, fmt: str):
        self.model, self.fmt, self.saved = model, fmt, None

    def __enter__(self):
        if self.fmt != "fp32":
            self.saved = [(p, p.data.copy()) for p in self.model.parameters() if getattr(p, "fmt", None) is None]
            round_model(self.model, self.fmt)
        return self.model

    def __exit__(self, *exc):
        for p, a in self.saved or ():
            p.data[...] = a
        self.saved = None
        return False


__all__ = ["FORMATS", "bf16_to_f32", "f32_to_bf16", "f32_to_bf16_sr", "finfo", "format_of", "from_f32",
           "in_format", "is_16bit", "round_model", "round_to_format", "storage_dtype", "to_f32"]
