"""Log-probabilities of given tokens: a masked log-softmax gather with a hand-written backward.

    token_logprobs(logits (B, T, V), targets (B, T))      -> (B, T) float64, 0 where ignored
    sequence_logprobs(logits, targets, average=False)     -> (B,)   sum (or mean) over kept tokens
    head_token_logprobs(x, w, targets)                    -> (B, T) the same of logits x @ w^T,
    head_sequence_logprobs(x, w, targets, average=False)  -> (B,)   never made (fused LM head)

Math (row n, logits z (V,), target t): logp_n = z_t - lse(z), lse(z) = m + log sum_j exp(z_j - m).
Backward: d logp_n / d z_j = [j == t] - softmax(z)_j, so dz = dout_n (onehot(t) - softmax(z)),
and 0 on ignored rows. That is the cross-entropy row's gradient with the opposite sign, so the
op runs the fused cross-entropy kernels (kernels/cross_entropy.py: one pass per row, no
probability matrix stored) with dloss = -dout.

Precision: whatever the model's dtype, the per-row log-softmax is computed in float32 or wider
(narrower logits are upcast first) and the result, and every sum over tokens after it, is
float64: DPO subtracts sequence log-probs of a few hundred tokens from each other, where
float32 sums would lose the difference.

The fused form (what DPO and GRPO train with: ``model.sequence_logprobs``,
``model.token_logprobs``) takes the final hidden states
x (B, T, C) and the head's weight w (V, C) and runs kernels/head_ce.py, whose per-row losses are
-log p. Its forward asks the kernel for the losses only (one x @ w^T GEMM per row chunk, no
gradient work). Unlike the mean cross-entropy, whose gradient is fixed up to one scalar, a
token log-prob's gradient weights every token by its own incoming gradient, dout_n (DPO's
dL/dlogp_b of the token's sequence, GRPO's advantage and KL term), known only once every row's
log-prob is; so backward runs the kernel again with scale_n = -dout_n per token and gets dx and
dw: one extra GEMM of the head (the forward's, recomputed) in place of the (B, T, V) logits and
their gradient. The sequence form is the token form summed over each row (and divided by the
row's token count with ``average``).

``token_logprobs_ref`` is the NumPy reference (float64 throughout) the op is tested against.
"""
from __future__ import annotations

import numpy as np

import kernels
from tinylm.backend import to_device, xp_of
from tinylm.tensor import ACCUMULATED, Function, Tensor

IGNORE = -100


def token_logprobs_ref(logits, targets, ignore_index: int = IGNORE) -> np.ndarray:
    """NumPy reference: (..., V), (...) -> (...) float64 log p(target), 0 where ignored."""
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets)
    m = z.max(axis=-1, keepdims=True)
    logp = z - (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))
    keep = t != ignore_index
    picked = np.take_along_axis(logp, np.where(keep, t, 0)[..., None], axis=-1)[..., 0]
    return np.where(keep, picked, 0.0)


class TokenLogProbs(Function):
    saved_lowp = ("z",)

    def forward(self, logits, targets, ignore_index):  # (N, V), (N,) -> (N,) float64
        xp = xp_of(logits)
        self.in_dtype = logits.dtype
        wide = np.promote_types(logits.dtype, np.float32)  # float16/bfloat16 -> float32
        z = xp.ascontiguousarray(logits, dtype=wide)
        loss_rows, self.lse = kernels.get("cross_entropy_fwd", z)(z, targets, ignore_index)
        self.z, self.targets, self.ignore_index = z, targets, ignore_index
        return -loss_rows.astype(np.float64)  # loss_n = lse - z_t = -logp_n (0 if ignored)

    def backward(self, dout):  # (N,) float64
        # logp_n = -loss_n  ->  d/dz = -dout * dloss_n/dz: the cross-entropy backward with -dout
        dloss = (-dout).astype(self.z.dtype)
        dz = kernels.get("cross_entropy_bwd", self.z)(self.z, self.targets, self.lse, dloss, self.ignore_index)
        return (dz if dz.dtype == self.in_dtype else dz.astype(self.in_dtype),)


def token_logprobs(logits: Tensor, targets, ignore_index: int = IGNORE) -> Tensor:
    """log p(targets) under logits, per position: (..., V), (...) -> (...) float64 Tensor."""
    t = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if t.dtype.kind not in "iu":
        raise TypeError(f"token_logprobs: targets must be integers, got {t.dtype}")
    if logits.shape[:-1] != t.shape:
        raise ValueError(f"token_logprobs: logits {logits.shape} need targets of shape {logits.shape[:-1]}, got {t.shape}")
    V = logits.shape[-1]
    flat = np.ascontiguousarray(t.reshape(-1), dtype=np.int64)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= V))
    if bad.any():
        raise ValueError(f"token_logprobs: target {int(flat[np.argmax(bad)])} is outside [0, {V})")
    lg = logits if logits.ndim == 2 else logits.reshape(-1, V)
    out = TokenLogProbs.apply(lg, targets=flat, ignore_index=int(ignore_index))
    return out.reshape(t.shape) if t.ndim != 1 else out


def sequence_logprobs(logits: Tensor, targets, ignore_index: int = IGNORE, average: bool = False) -> Tensor:
    """Sum (``average``: mean) of log p over each row's kept targets: (B, T, V), (B, T) -> (B,)."""
    t = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    return _per_sequence(token_logprobs(logits, t, ignore_index), t, ignore_index, average)


def _per_sequence(token_lp: Tensor, t: np.ndarray, ignore_index: int, average: bool) -> Tensor:
    """(B, T) token log-probs -> (B,): each row's sum, or with ``average`` its mean over the
    row's kept targets (a row with none: 0)."""
    lp = token_lp.sum(axis=-1)
    if average:
        lp = lp * (1.0 / np.maximum((t != ignore_index).sum(axis=-1), 1).astype(np.float64))
    return lp


class HeadTokenLogProbs(Function):
    """(B, T, C) hidden states, (V, C) head -> (B, T) float64 log p(target), 0 where ignored;
    see the module docstring."""
    saved_lowp = ("x2", "w")

    def forward(self, x, w, targets, ignore_index, w_from=None):  # targets (B, T) int64
        xp = xp_of(x)
        self.x_shape, self.ignore_index, self.w_from = x.shape, ignore_index, w_from or 0
        self.x2 = xp.ascontiguousarray(x.reshape(-1, x.shape[-1]))
        self.w = xp.ascontiguousarray(w)
        self.t = xp.ascontiguousarray(targets.reshape(-1))
        self.kernel = kernels.get("head_ce", self.x2, self.w)
        loss_rows = self.kernel(self.x2, self.w, self.t, ignore_index, 1.0, False, False)[0]
        return -loss_rows.astype(np.float64).reshape(targets.shape)  # logp = -loss; 0 on ignored rows

    def backward(self, dout):  # (B, T) float64
        from kernels.head_ce import give_back  # noqa: PLC0415
        from tinylm.functional import rows_from, scaled_into_sink  # noqa: PLC0415

        scale = -dout.reshape(-1)  # each token its own weight: d(-loss_n) (ignored rows: the kernel drops them)
        want_dx, want_dw = self.needs_grad[0], self.needs_grad[1]
        _, _, dx, dw = self.kernel(self.x2, self.w, self.t, self.ignore_index, scale, want_dx, want_dw,
                                   self.w_from)
        if want_dw and self.w_from:
            dw = rows_from(dw, self.w_from)
        elif want_dw:
            out = scaled_into_sink(self, 1, dw)
            if out is ACCUMULATED:  # added into the gradient buffer: the array serves the next call
                give_back(dw)
            dw = out
        return dx.reshape(self.x_shape) if want_dx else None, dw


def head_token_logprobs(x: Tensor, w: Tensor, targets, ignore_index: int = IGNORE) -> Tensor:
    """``token_logprobs(linear_t(x, w), targets)`` without the (B, T, V) logits: x (B, T, C)
    final hidden states, w (V, C) the head's weight (PyTorch's layout), targets (B, T) -> (B, T)
    float64, 0 where ignored. A head that trains only some rows (LoRA's grown vocabulary) gets
    the gradient of those rows only."""
    from tinylm import functional as F  # noqa: PLC0415

    if x.ndim != 3 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"head_token_logprobs: need x (B, T, C) and w (V, C), got {x.shape} and {w.shape}")
    t = F._checked_targets(xp_of(x.data), targets, x.shape[:-1], w.shape[0], int(ignore_index),
                           "head_token_logprobs")
    return HeadTokenLogProbs.apply(x, w, targets=t.reshape(x.shape[:-1]), ignore_index=int(ignore_index),
                                   **F._trained_from(w, 0))


def head_sequence_logprobs(x: Tensor, w: Tensor, targets, ignore_index: int = IGNORE,
                           average: bool = False) -> Tensor:
    """``sequence_logprobs(linear_t(x, w), targets)`` without the (B, T, V) logits: the sum (or
    mean) over each row of ``head_token_logprobs``, (B,) float64."""
    t = np.asarray(to_device(targets.data if isinstance(targets, Tensor) else targets, "cpu"))
    return _per_sequence(head_token_logprobs(x, w, targets, ignore_index), t, ignore_index, average)
