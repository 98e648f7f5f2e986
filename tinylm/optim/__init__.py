"""Optimisation: the flat parameter store, AdamW over it, and the learning-rate schedule.

``ParamStore`` (store.py) owns the flat buffers: parameters, gradients and any per-element state
an optimizer asks for (AdamW's two moments). Every ``Parameter.data`` and ``.grad`` is a view
into them. ``AdamW`` (adamw.py) *uses* a store, it does not own one: a later mixed-precision
run keeps a low-precision working copy beside the store's fp32 masters, and ZeRO shards any of
its buffers by contiguous ranges, without the optimizer changing. ``schedule.py`` has warmup +
cosine, and the piecewise schedule a resumed run extends explicitly.
"""
from tinylm.optim.adamw import AdamW
from tinylm.optim.schedule import Schedule, cosine_lr
from tinylm.optim.store import ParamStore

__all__ = ["AdamW", "ParamStore", "Schedule", "cosine_lr"]
