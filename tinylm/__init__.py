"""tinylm: a language-model stack from first principles.

Start reading at ``tinylm/tensor.py`` (the engine), then ``tinylm/ops.py`` (primitive ops),
``tinylm/functional.py`` (fused LLM ops) and ``kernels/`` (how they are computed).
"""
import os as _os

# Numba's OpenMP workers spin after each parallel kernel by default, and so do OpenBLAS's
# threads after each GEMM; a model alternates the two, so on 2 cores each pool's spinning
# starves the other. Measured here (2 cores, M config): KV-cache generation 7.6 -> 224 tokens/s,
# training step S 426 -> 230 ms, M 2189 -> 1942 ms with passive waiting. Must be set before the
# OpenMP runtime loads (Numba loads it at the first parallel launch); a user's value wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tinylm._version import __version__
from tinylm import functional
from tinylm.gradcheck import GradcheckError, gradcheck
from tinylm.tensor import Function, Tensor, is_grad_enabled, no_grad, tensor

F = functional


def set_num_threads(n: int) -> int:
    """Threads for Numba's parallel kernels and for BLAS, set together (default: the cores,
    or ``TINYLM_NUM_THREADS``)."""
    from kernels import _threads  # noqa: PLC0415 (imports Numba: not at `import tinylm`)

    return _threads.set_num_threads(n)

__all__ = [
    "__version__", "Function", "F", "GradcheckError", "Tensor", "functional", "gradcheck",
    "is_grad_enabled", "no_grad", "set_num_threads", "tensor",
]
