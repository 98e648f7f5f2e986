"""The training loop's mixed-precision steps (tinylm/train/loop.py calls these, marked [amp #13]).

    setup:        Policy from cfg.dtype / cfg.master_weights; the store switched to the format
                  (fp32 masters + working copy, or bf16 alone); a LossScaler for fp16
    each step:    the forward under ``autocast(dtype)`` (tinylm/tensor.py): the activations
                  kept for backward are 16-bit Tensors; backward of loss * S (fp16) ->
                  gradients rounded to the format as 16-bit storage would hold them ->
                  unscaled (x 1/S), checked, clipped in fp32, one pass -> the scaler decides:
                  apply the step, or skip it and halve S
    checkpoints:  the fp32 masters as the model's weights and in the optimizer state, and the
                  scaler's state in state.json (key "amp"), so a resume is exact

On several ranks (a communicator): the ZeroOptimizer holds the fp32 masters, sharded as its
moments are, and does the same three things on its own range of the reduced gradients
(tinylm/distributed/zero.py, "Mixed precision"); the gradient norm and the found-inf flag are
all-reduced, so every rank's scaler takes the same decision and the scalers stay equal.
"""
from __future__ import annotations

import contextlib

from tinylm.amp.policy import Policy
from tinylm.amp.scaler import LossScaler
from tinylm.tensor import autocast


def setup(store, cfg, comm=None, opt=None):
    """(policy, scaler or None) for a run's config; switches ``store`` (one process) or the
    data-parallel optimizer ``opt`` (with ``comm``: its masters are sharded) to the format."""
    policy = Policy(getattr(cfg, "dtype", "fp32"), bool(getattr(cfg, "master_weights", True)))
    if not policy.mixed:
        return policy, None
    seed = int(getattr(cfg, "seed", 0))
    if comm is not None:
        if opt is None or not hasattr(opt, "set_format"):
            raise TypeError(f"dtype={policy.dtype} on several ranks needs the data-parallel optimizer (opt=)")
        opt.set_format(policy.dtype, master=policy.master_weights, seed=seed)
    else:
        store.set_format(policy.dtype, master=policy.master_weights, seed=seed)
    scaler = None
    if policy.needs_scaler:
        init = float(getattr(cfg, "loss_scale_init", 2.0 ** 16))
        scaler = LossScaler(init_scale=init, growth_interval=int(getattr(cfg, "loss_scale_window", 2000)),
                            min_scale=float(getattr(cfg, "loss_scale_min", 1.0)), max_scale=max(2.0 ** 24, init))
    return policy, scaler


def activations(policy: Policy):
    """The context a step's forward (and the validation) runs in: ``autocast`` to the run's
    format, so the activations kept for backward are 16-bit; nothing for fp32."""
    return autocast(policy.dtype) if policy.mixed else contextlib.nullcontext()


def grads_ready(store, scaler, max_norm: float) -> tuple[float, bool]:
    """After backward: (gradient norm, apply the step?). The gradients are rounded to the
    store's format, then unscaled and clipped in fp32; with a scaler, a non-finite gradient
    means: skip this step, and the scaler halves its scale. ``store``: the ParamStore, or on
    several ranks the ZeroOptimizer (the same three methods, over ranks)."""
    store.round_grads()
    if scaler is None:
        return store.clip_grad_norm(max_norm), True
    norm, finite = store.unscale_clip(1.0 / scaler.scale, max_norm)
    return norm, scaler.update(not finite)


def state(policy, scaler) -> dict:
    """The entries a 16-bit run adds to state.json (none for fp32: its state.json is unchanged)."""
    if not policy.mixed:
        return {}
    return {"amp": {"dtype": policy.dtype, "master_weights": policy.master_weights,
                    "scaler": None if scaler is None else scaler.state()}}


def restore_scaler(scaler, saved: dict | None):
    """The scaler a resumed run continues with: the checkpoint's, when it has one."""
    if scaler is None or not saved or not saved.get("scaler"):
        return scaler
    return LossScaler.from_state(saved["scaler"])
