"""Finite-difference gradient checking, public: check your own ops with it.

``gradcheck(fn, inputs)`` compares the gradient the engine computes with central differences
in float64:

- small problems (inputs x outputs <= ``full_jacobian_limit`` elements): the whole Jacobian,
  one backward per output element against one pair of forward calls per input element;
- larger ones: ``n_directions`` random directions: for a random output weighting r and a random
  input direction d, (L(x + eps d) - L(x - eps d)) / 2 eps against <dL/dx, d>, where
  L = sum(r * fn(x)). A wrong gradient passes this only on a measure-zero set of directions.

It returns True or raises ``GradcheckError`` naming the input, the worst element and both
values. Inputs that require grad must be float64: float32 differences are too coarse to
tell a wrong gradient from rounding (eps=1e-6 on float32 values is below their resolution).
"""
from __future__ import annotations

import numpy as np

from tinylm.backend import to_device, xp_of
from tinylm.tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    """A gradient disagrees with finite differences; the message says where and by how much."""


def _scalar(fn, inputs, r) -> float:
    with no_grad():
        out = fn(*inputs)
    return float((to_device(out.data, "cpu").astype(np.float64) * r).sum())


def gradcheck(fn, inputs, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-3,
              n_directions: int = 4, full_jacobian_limit: int = 4096, seed: int = 0) -> bool:
    """Check ``fn(*inputs)``'s gradients w.r.t. every input with ``requires_grad``.

    ``fn`` maps tensors to one tensor (any shape). A gradient element passes when
    ``|analytic - numeric| <= atol + rtol * |numeric|``.
    """
    inputs = list(inputs)
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires grad; nothing to check")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} is {inputs[i].dtype}; use float64 inputs for finite differences")
    rng = np.random.default_rng(seed)

    with no_grad():
        out0 = fn(*inputs)
    if not isinstance(out0, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(out0).__name__}")
    out_shape = out0.shape
    n_out = int(np.prod(out_shape))
    n_in = sum(inputs[i].size for i in checked)

    def analytic(weights: np.ndarray) -> list[np.ndarray]:
        for i in checked:
            inputs[i].grad = None
        out = fn(*inputs)
        xp = xp_of(out.data)
        out.backward(xp.asarray(weights.reshape(out_shape)))
        grads = []
        for i in checked:
            g = inputs[i].grad
            grads.append(np.zeros(inputs[i].shape) if g is None else to_device(g, "cpu").astype(np.float64))
            inputs[i].grad = None
        return grads

    def perturbed(i: int, delta: np.ndarray, r: np.ndarray) -> float:
        """(L(x_i + delta) - L(x_i - delta)) / 2 with L = sum(r * fn(x))."""
        t = inputs[i]
        orig = t.data
        xp = xp_of(orig)
        try:
            t.data = orig + xp.asarray(delta)
            plus = _scalar(fn, inputs, r)
            t.data = orig - xp.asarray(delta)
            minus = _scalar(fn, inputs, r)
        finally:
            t.data = orig
        return (plus - minus) / 2.0

    if n_in * n_out <= full_jacobian_limit:
        # whole Jacobian. Numeric: column k from one pair of forwards with input element k
        # moved by +-eps. Analytic: row j of J^T from one backward with the one-hot weighting e_j.
        numeric = {}
        for i in checked:
            t = inputs[i]
            orig = t.data
            xp = xp_of(orig)
            jac = np.zeros((n_out,) + t.shape)
            for idx in np.ndindex(*t.shape):
                d = np.zeros(t.shape)
                d[idx] = eps
                try:
                    t.data = orig + xp.asarray(d)
                    with no_grad():
                        plus = to_device(fn(*inputs).data, "cpu").astype(np.float64).reshape(-1)
                    t.data = orig - xp.asarray(d)
                    with no_grad():
                        minus = to_device(fn(*inputs).data, "cpu").astype(np.float64).reshape(-1)
                finally:
                    t.data = orig
                jac[(slice(None),) + idx] = (plus - minus) / (2 * eps)
            numeric[i] = jac
        for j in range(n_out):
            r = np.zeros(n_out)
            r[j] = 1.0
            grads = analytic(r.reshape(out_shape))
            where = tuple(int(x) for x in np.unravel_index(j, out_shape)) if out_shape else ()
            for g, i in zip(grads, checked):
                _compare(g, numeric[i][j], i, atol, rtol, f"d out{list(where)} / d input {i}")
        return True

    for k in range(n_directions):
        r = rng.standard_normal(out_shape)
        grads = analytic(r)
        for g, i in zip(grads, checked):
            d = rng.standard_normal(inputs[i].shape)
            d /= max(np.linalg.norm(d), 1e-300)
            num = perturbed(i, d * eps, r) / eps
            ana = float((g * d).sum())
            if not abs(ana - num) <= atol + rtol * abs(num):
                raise GradcheckError(
                    f"gradcheck failed for input {i} (shape {inputs[i].shape}) along random direction {k}: "
                    f"analytic {ana:.8g}, numeric {num:.8g}, |diff| {abs(ana - num):.3g} > "
                    f"atol + rtol*|numeric| = {atol + rtol * abs(num):.3g}"
                )
    return True


def _compare(ana: np.ndarray, num: np.ndarray, i: int, atol: float, rtol: float, what: str) -> None:
    err = np.abs(ana - num) - (atol + rtol * np.abs(num))
    if ana.size and (not np.all(np.isfinite(ana)) or err.max() > 0):
        bad = np.nonzero(~np.isfinite(ana))[0]
        w = np.unravel_index(int(np.argmax(np.where(np.isfinite(ana), err, np.inf))), ana.shape)
        raise GradcheckError(
            f"gradcheck failed for {what} (input shape {ana.shape}): worst element {tuple(int(x) for x in w)}: "
            f"analytic {ana[w]:.8g}, numeric {num[w]:.8g}, |diff| {abs(ana[w] - num[w]):.3g} > "
            f"atol + rtol*|numeric| = {atol + rtol * abs(num[w]):.3g}"
            + (f" ({len(bad)} non-finite analytic values)" if len(bad) else "")
        )
