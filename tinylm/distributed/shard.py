"""Sharding is arithmetic on one flat buffer: which rank owns which elements, written once.

Every ParamStore group is one flat buffer of ``n`` elements (tinylm/optim/store.py). Over
``world`` ranks it is padded to ``padded = world * size`` with ``size = ceil(n / world)``,
and rank r owns the contiguous range [r * size, (r + 1) * size) of it: its optimizer state
(moments, fp32 masters) is ``size`` elements, the last rank's tail past ``n`` being padding
that is always zero and never communicated. A padded buffer is never refused, whatever n.

    n = 10, world = 3 -> size 4, padded 12
    rank 0 [0, 4)   rank 1 [4, 8)   rank 2 [8, 10) + 2 padding

Every collective of ZeRO stages 1-3 is about one contiguous range [a, b) of a group (a
bucket of gradients, a layer's parameters): ``split(a, b)`` says how many of its elements
each rank owns and where they sit in the range, the counts and displacements of the v-variant
collectives (reduce-scatter with per-rank counts, all-gather-v).

    split(3, 9) with n = 10, world = 3 -> counts [1, 4, 1], displs [0, 1, 5]

Stage 1, 2 and 3 differ only in which buffers exist whole and which as ranges; the ranges are
these.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    n: int        # elements of the group's flat buffer
    world: int    # ranks
    rank: int     # this rank

    @property
    def size(self) -> int:
        """Elements each rank owns (padding included)."""
        return -(-self.n // self.world) if self.n else 0

    @property
    def padded(self) -> int:
        return self.size * self.world

    def owned(self, r: int | None = None) -> tuple[int, int]:
        """Rank r's range of real elements [lo, hi) (empty when r owns only padding)."""
        r = self.rank if r is None else r
        lo = min(r * self.size, self.n)
        return lo, min(lo + self.size, self.n) if lo < self.n else lo

    @property
    def valid(self) -> int:
        """Real (non-padding) elements of this rank's shard."""
        lo, hi = self.owned()
        return hi - lo

    def split(self, a: int, b: int) -> tuple[list[int], list[int]]:
        """Per rank, how many of [a, b) it owns and where they start inside [a, b)."""
        counts, displs = [], []
        for r in range(self.world):
            lo, hi = self.owned(r)
            lo, hi = max(lo, a), min(hi, b)
            counts.append(max(0, hi - lo))
            displs.append(max(0, lo - a) if hi > lo else 0)
        return counts, displs

    def mine(self, a: int, b: int) -> tuple[int, int, int]:
        """This rank's part of [a, b): (start in the range, start in the shard, count)."""
        lo, hi = self.owned()
        lo, hi = max(lo, a), min(hi, b)
        if hi <= lo:
            return 0, 0, 0
        return lo - a, lo - self.owned()[0], hi - lo
