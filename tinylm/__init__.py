"""tinylm: a language-model stack from first principles.

Start reading at ``tinylm/tensor.py`` (the engine), then ``tinylm/ops.py`` (primitive ops),
``tinylm/functional.py`` (fused LLM ops) and ``kernels/`` (how they are computed).
"""
from tinylm import _malloc
from tinylm._version import __version__
from tinylm import functional
from tinylm.gradcheck import GradcheckError, gradcheck
from tinylm.tensor import Function, Tensor, is_grad_enabled, no_grad, tensor

F = functional
_malloc.tune()  # keep freed activations' memory mapped for the next step (see tinylm/_malloc.py)


def load(checkpoint_dir):
    """``model, tokenizer = tinylm.load("out/checkpoint")``: any tinylm checkpoint (GPT or
    Llama), in eval mode. Errors name the file and what is wrong (tinylm.train.CheckpointError)."""
    from tinylm.train.checkpoint import load_model  # noqa: PLC0415

    return load_model(checkpoint_dir)


def set_num_threads(n: int) -> int:
    """Threads for Numba's parallel kernels, which also run tinylm's BLAS calls (default: the
    cores, or ``TINYLM_NUM_THREADS``); OpenBLAS's own pool stays at one (kernels/_threads.py)."""
    from kernels import _threads  # noqa: PLC0415 (imports Numba: not at `import tinylm`)

    return _threads.set_num_threads(n)

__all__ = [
    "__version__", "Function", "F", "GradcheckError", "Tensor", "functional", "gradcheck",
    "is_grad_enabled", "load", "no_grad", "set_num_threads", "tensor",
]
