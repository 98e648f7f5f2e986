"""Modules and parameters: the small amount of structure a model needs, and no more.

``Parameter`` is a leaf Tensor that requires grad. ``Module`` finds parameters and submodules
by walking its attributes (lists of modules included), names them with dotted paths
(``h.0.attn.c_attn.weight``: GPT-2's names, so loading its weights is a name-by-name copy),
and provides ``state_dict``/``load_state_dict`` and train/eval mode.

Leaves out: hooks, buffers, parameter sharing across modules other than by assignment (weight
tying is done by pointing two modules at one Parameter; ``named_parameters`` lists it once).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from tinylm import functional as F
from tinylm.backend import to_device, xp_of
from tinylm.tensor import Tensor


class Parameter(Tensor):
    def __init__(self, data, dtype=None):
        super().__init__(data, requires_grad=True, dtype=dtype)


class Module:
    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def _children(self) -> Iterator[tuple[str, object]]:
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    if isinstance(v, (Parameter, Module)):
                        yield f"{name}.{i}", v

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Every parameter once (a tied one under its first name), depth first in the order
        the attributes were assigned."""
        seen: set[int] = set()

        def walk(pre: str, mod: "Module"):
            for name, value in mod._children():
                if isinstance(value, Parameter):
                    if id(value) not in seen:
                        seen.add(id(value))
                        yield f"{pre}{name}", value
                else:
                    yield from walk(f"{pre}{name}.", value)

        return walk(prefix, self)

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def modules(self) -> Iterator["Module"]:
        yield self
        for _, value in self._children():
            if isinstance(value, Module):
                yield from value.modules()

    def num_params(self) -> int:
        return sum(p.size for p in self.parameters())

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def to(self, device: str) -> "Module":
        """Move every parameter's data to "cpu" or "gpu" in place (gradients are dropped)."""
        for p in self.parameters():
            p.data = to_device(p.data, device)
            p.grad = None
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """Name -> NumPy array (copied to the CPU) for every parameter."""
        return {name: to_device(p.data, "cpu") for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters by name; shapes must match. With ``strict``, a
        missing or unexpected name is an error that lists them."""
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                           f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}")
        for name, p in params.items():
            if name not in state:
                continue
            a = np.asarray(to_device(state[name], "cpu"))
            if a.shape != p.shape:
                raise ValueError(f"load_state_dict: {name} has shape {a.shape} in the state, {p.shape} in the model")
            p.assign(a)


class Linear(Module):
    """y = x @ W + bias. ``layout="in_out"``: weight (in, out), GPT-2's Conv1D layout;
    ``layout="out_in"``: weight (out, in), PyTorch's nn.Linear (Llama's checkpoints), computed
    as x @ weight^T without a transpose op."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True, rng=None, std: float = 0.02, dtype=np.float32,
                 layout: str = "in_out"):
        if layout not in ("in_out", "out_in"):
            raise ValueError(f"Linear: layout must be 'in_out' or 'out_in', got {layout!r}")
        rng = rng if rng is not None else np.random.default_rng()
        self.layout = layout
        shape = (n_in, n_out) if layout == "in_out" else (n_out, n_in)
        self.weight = Parameter(rng.normal(0.0, std, shape), dtype=dtype)
        self.bias = Parameter(np.zeros(n_out), dtype=dtype) if bias else None

    def forward(self, x):
        if self.layout == "out_in":
            return F.linear_t(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class LayerNorm(Module):
    def __init__(self, n: int, bias: bool = True, eps: float = 1e-5, dtype=np.float32):
        self.weight = Parameter(np.ones(n), dtype=dtype)
        # without a bias the op still takes one: a constant zero tensor, not a parameter
        self.bias = Parameter(np.zeros(n), dtype=dtype) if bias else None
        self._zero = Tensor(np.zeros(n, dtype=dtype))
        self.eps = eps

    def forward(self, x):
        b = self.bias if self.bias is not None else self._zero
        return F.layer_norm(x, self.weight, b, self.eps)


class RMSNorm(Module):
    """Llama's norm: x / sqrt(mean(x^2) + eps) * weight (no mean subtraction, no bias)."""

    def __init__(self, n: int, eps: float = 1e-6, dtype=np.float32):
        self.weight = Parameter(np.ones(n), dtype=dtype)
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)


class Embedding(Module):
    def __init__(self, num: int, dim: int, rng=None, std: float = 0.02, dtype=np.float32):
        rng = rng if rng is not None else np.random.default_rng()
        self.weight = Parameter(rng.normal(0.0, std, (num, dim)), dtype=dtype)

    def forward(self, ids):
        return F.embedding(ids, self.weight)
