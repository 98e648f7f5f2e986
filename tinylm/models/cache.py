"""The KV cache: each layer's keys and values, so a new token costs one position of work.

``KVCache(n_layer, B, n_kv_head, max_len, head_size)`` holds per layer two arrays of shape
(B, NKV, max_len, hs). A model's forward with ``cache=`` writes the new positions' keys and
values at ``start`` and attends over positions ``0 .. start + T``; ``cache.pos`` is how many
positions are filled. It is plain arrays (no autograd): a cache is for inference.

Rows of one batch may sit at different positions (a server decoding many requests together):
then ``start`` is an int array (B,), each row writes at its own position, and attention masks
each row's keys past its own end. ``row(r)`` is a batch-1 view of row r, so a request's prompt
can be prefilled into its row alone.

``work`` holds the scratch arrays of the one-token decoding step (tinylm/models/decode.py),
so a generated token allocates no per-layer buffers.

Leaves out: paged or ring-buffer caches (when the context fills, tinylm.generate restarts the
cache from the last half window).
"""
from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_size: int,
                 dtype=np.float32, xp=np):
        shape = (batch, n_kv_head, max_len, head_size)
        self.k = [xp.zeros(shape, dtype) for _ in range(n_layer)]
        self.v = [xp.zeros(shape, dtype) for _ in range(n_layer)]
        self.max_len, self.batch = max_len, batch
        self.pos = 0  # positions 0 .. pos-1 hold keys and values
        self.work = {}  # scratch arrays of the one-token step (tinylm/models/decode.py), kept between steps

    def row(self, r: int) -> "KVCache":
        """A batch-1 cache whose arrays are views of row r of this one."""
        view = KVCache.__new__(KVCache)
        view.k = [K[r:r + 1] for K in self.k]
        view.v = [V[r:r + 1] for V in self.v]
        view.max_len, view.batch, view.pos = self.max_len, 1, 0
        view.work = {}
        return view

    def update(self, layer: int, k, v, start):
        """Store k, v (B, NKV, T, hs) at positions start..start+T-1 (``start`` an int, or one
        per row); return the keys and values of positions 0..max(start)+T-1 (views)."""
        T = k.shape[2]
        per_row = not isinstance(start, (int, np.integer))
        lo, hi = (int(np.min(start)), int(np.max(start))) if per_row else (start, start)
        if lo < 0 or hi + T > self.max_len:
            raise ValueError(f"KV cache: positions {lo}..{hi + T - 1} do not fit in its {self.max_len}")
        if k.shape[0] != self.batch:
            raise ValueError(f"KV cache: built for batch {self.batch}, got {k.shape[0]} rows")
        K, V = self.k[layer], self.v[layer]
        if per_row:
            for b, s0 in enumerate(np.asarray(start).tolist()):
                K[b, :, s0:s0 + T] = k[b]
                V[b, :, s0:s0 + T] = v[b]
        else:
            K[:, :, start:start + T] = k
            V[:, :, start:start + T] = v
        return K[:, :, :hi + T], V[:, :, :hi + T]
