"""The (op, backend) -> function registry and the dispatch rule.

Backends: ``"ref"`` (NumPy reference), ``"cpu"`` (Numba), ``"gpu"`` (numba.cuda / CuPy).
The array type picks the backend: a CuPy array -> "gpu", anything else -> "cpu". The environment
variable ``TINYLM_KERNELS=ref`` forces the NumPy references (for study and bisecting), and
``TINYLM_KERNELS=gpu`` the GPU variants (with ``NUMBA_ENABLE_CUDASIM=1``: the GPU path run on the
CPU under Numba's simulator). It is read at each call, so tests can flip it with
``monkeypatch.setenv``.

16-bit arrays (bf16 as uint16, fp16 as float16) among the arrays ``get`` is given select a
wrapper that converts them to float32 on entry and stores activations in the format on exit
(kernels/_lowp.py); float32 and float64 arrays get the kernel itself, unchanged.

Families register lazily: ``get("layernorm_fwd", x)`` imports ``kernels.layernorm`` the first
time an op of that family is asked for, so ``import kernels`` costs nothing.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

_REGISTRY: dict[tuple[str, str], Callable] = {}

# op name -> module that registers it. The op's family is the module.
_FAMILY = {
    "layernorm_fwd": "kernels.layernorm", "layernorm_bwd": "kernels.layernorm",
    "gelu_fwd": "kernels.gelu", "gelu_bwd": "kernels.gelu",
    "cross_entropy_fwd": "kernels.cross_entropy", "cross_entropy_bwd": "kernels.cross_entropy",
    "head_ce": "kernels.head_ce",
    "attention_fwd": "kernels.attention", "attention_bwd": "kernels.attention",
    "embedding_fwd": "kernels.embedding", "embedding_bwd": "kernels.embedding",
    "adamw_update": "kernels.adamw",
    "sumsq": "kernels.gradnorm",
    "matmul": "kernels.matmul", "matmul_acc": "kernels.matmul",
    "rmsnorm_fwd": "kernels.rmsnorm", "rmsnorm_bwd": "kernels.rmsnorm",
    "rope_fwd": "kernels.rope", "rope_bwd": "kernels.rope",
    "swiglu_fwd": "kernels.swiglu", "swiglu_bwd": "kernels.swiglu",
    "attention_decode": "kernels.attention_decode",
}

BACKENDS = ("ref", "cpu", "gpu")
_threads_applied = False


def _apply_threads() -> None:
    """TINYLM_NUM_THREADS -> Numba and BLAS, once, when the first kernel is asked for (not at
    import: it imports Numba, which `tinylm --help` should not pay for)."""
    global _threads_applied
    from kernels import _threads  # noqa: PLC0415

    _threads.apply_env()
    _threads_applied = True


def register(op: str, backend: str):
    """Decorator: ``@register("gelu_fwd", "cpu")`` makes the function the cpu variant of gelu_fwd."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        _REGISTRY[(op, backend)] = fn
        return fn

    return deco


def backend_of(*arrays) -> str:
    """"gpu" if any argument is a CuPy array, else "cpu"."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            return "gpu"
    return "cpu"


def _load(op: str) -> None:
    mod = _FAMILY.get(op)
    if mod is None:
        raise KeyError(f"unknown kernel op {op!r}; known ops: {sorted(_FAMILY)}")
    importlib.import_module(mod)


def available(op: str) -> list[str]:
    """Backends that have a registered variant of ``op`` (loads its family)."""
    _load(op)
    return [b for b in BACKENDS if (op, b) in _REGISTRY]


def get(op: str, *arrays, backend: str | None = None) -> Callable:
    """The function computing ``op`` for these arrays.

    ``backend`` overrides the choice; otherwise ``TINYLM_KERNELS=ref`` forces the reference, and
    the array type picks "gpu" or "cpu". A cpu op with no Numba variant falls back to "ref".
    """
    if (op, "ref") not in _REGISTRY:
        _load(op)
    if not _threads_applied:
        _apply_threads()
    if backend is None:
        forced = os.environ.get("TINYLM_KERNELS", "").strip().lower()
        if forced not in ("", "auto", "ref", "gpu"):
            raise ValueError(f"TINYLM_KERNELS={forced!r}: expected 'ref', 'gpu' or unset")
        # "gpu" forces the GPU variants whatever the array type: with NUMBA_ENABLE_CUDASIM=1
        # they run on NumPy arrays, which is how the whole GPU path is tested without a GPU
        backend = forced if forced in ("ref", "gpu") else backend_of(*arrays)
    fn = _REGISTRY.get((op, backend))
    if fn is None and backend == "cpu":
        fn = _REGISTRY.get((op, "ref"))
    if fn is None:
        raise NotImplementedError(f"kernel {op!r} has no {backend!r} variant")
    if _has_16bit(arrays):  # bf16 (uint16) / fp16 arrays: converted on entry, fp32 inside (kernels/_lowp.py)
        from kernels._lowp import accept_16bit  # noqa: PLC0415

        return accept_16bit(op, fn)
    return fn


def _has_16bit(arrays) -> bool:
    for a in arrays:
        dt = getattr(a, "dtype", None)
        if dt is not None and dt.itemsize == 2 and dt.kind in "uf":  # uint16 = bf16, float16 = fp16
            return True
    return False
