"""The KV cache: each layer's keys and values, so a new token costs one position of work.

``KVCache(n_layer, B, n_kv_head, max_len, head_size)`` holds per layer two arrays of shape
(B, NKV, max_len, hs). A model's forward with ``cache=`` writes the new positions' keys and
values at ``start`` and attends over positions ``0 .. start + T``; ``cache.pos`` is how many
positions are filled. It is plain arrays (no autograd): a cache is for inference.

Leaves out: paged or ring-buffer caches (when the context fills, tinylm.generate restarts the
cache from the last half window), per-row lengths (rows of one batch share positions).
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

    def update(self, layer: int, k, v, start: int):
        """Store k, v (B, NKV, T, hs) at positions start..start+T-1; return the keys and values
        of positions 0..start+T-1 (views)."""
        T = k.shape[2]
        if start < 0 or start + T > self.max_len:
            raise ValueError(f"KV cache: positions {start}..{start + T - 1} do not fit in its {self.max_len}")
        if k.shape[0] != self.batch:
            raise ValueError(f"KV cache: built for batch {self.batch}, got {k.shape[0]} rows")
        K, V = self.k[layer], self.v[layer]
        K[:, :, start:start + T] = k
        V[:, :, start:start + T] = v
        return K[:, :, :start + T], V[:, :, :start + T]
