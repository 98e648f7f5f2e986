"""Learning-rate schedules: linear warmup then cosine decay, and the piecewise schedule that a
resumed run extends explicitly.

A run plans its schedule for ``max_steps``. Resuming with more steps must not silently restart
the cosine (lr would jump from its end value back near the peak): ``Schedule.extend`` appends a
new cosine segment that starts at the lr the schedule has reached and decays to ``min_lr`` over
the added steps. The segments are saved in the checkpoint, so a resumed run follows exactly the
schedule the interrupted one would have.
"""
from __future__ import annotations

import math


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``.

    step counts from 0: lr(0) = max_lr / warmup, lr(warmup - 1) = max_lr, lr(total) = min_lr.
    """
    if warmup > 0 and step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    frac = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * frac))


class Schedule:
    """Warmup + cosine to ``total``, then any number of appended cosine segments
    ``[start, end)`` decaying from the lr reached at ``start`` to ``min_lr`` at ``end``."""

    def __init__(self, max_lr: float, min_lr: float, warmup: int, total: int, segments=None):
        self.max_lr, self.min_lr, self.warmup, self.total = float(max_lr), float(min_lr), int(warmup), int(total)
        self.segments: list[list] = [list(s) for s in (segments or [])]  # [start, end, lr_start]

    @property
    def end(self) -> int:
        return self.segments[-1][1] if self.segments else self.total

    def __call__(self, step: int) -> float:
        for start, end, lr0 in reversed(self.segments):
            if step >= start:
                if step >= end:
                    return self.min_lr
                frac = (step - start) / max(1, end - start)
                return self.min_lr + 0.5 * (lr0 - self.min_lr) * (1.0 + math.cos(math.pi * frac))
        return cosine_lr(step, self.max_lr, self.min_lr, self.warmup, self.total)

    def extend(self, at_step: int, new_end: int) -> None:
        """Continue from the lr at ``at_step`` down to ``min_lr`` at ``new_end``."""
        if new_end <= self.end:
            raise ValueError(f"the schedule already runs to step {self.end}; extend it past that, not to {new_end}")
        self.segments.append([int(at_step), int(new_end), self(at_step)])

    def state(self) -> dict:
        return {"max_lr": self.max_lr, "min_lr": self.min_lr, "warmup": self.warmup, "total": self.total,
                "segments": self.segments}

    @classmethod
    def from_state(cls, s: dict) -> "Schedule":
        return cls(s["max_lr"], s["min_lr"], s["warmup"], s["total"], s.get("segments"))
