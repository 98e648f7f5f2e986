"""The dynamic loss scaler for fp16: a small state machine, no tensors in it.

fp16's smallest subnormal is 6e-8 and its largest value 65504, so a gradient of 1e-9 is zero
in fp16 and a gradient of 1e5 is infinite. Multiplying the loss by a scale S before backward
multiplies every gradient by S (the chain rule is linear), lifting the small ones into range;
the optimizer divides by S again, in fp32, before it uses them. S is found at run time:

    state: scale S, good_steps n (steps since the last overflow or growth)

    after each backward, found_inf = any gradient is inf or NaN
      found_inf:  skip the step (no update), S <- S / 2, n <- 0;
                  S < min_scale: stop (LossScaleTooSmall: the model's gradients overflow even
                  unscaled, so no scale can help; what users see otherwise is a scale stuck at
                  its minimum and a model that never learns, DeepSpeed issue #697)
      else:       apply the step, n <- n + 1; n == growth_interval: S <- min(2 S, max_scale), n <- 0

Defaults as PyTorch's GradScaler (initial 2^16, growth every 2000 clean steps, factors 2 and
1/2). Powers of two only, so scaling and unscaling are exact in binary floating point.
bf16 needs no scaler: it has fp32's exponent range.

>>> s = LossScaler(init_scale=8.0, growth_interval=2, min_scale=2.0)
>>> [s.update(found_inf) for found_inf in (True, False, False, True)], s.scale, s.skipped
([False, True, True, False], 4.0, 2)

``state()`` / ``from_state()`` round-trip through JSON (checkpoints' state.json), so a resumed
run skips and grows on exactly the same steps as an uninterrupted one.
"""
from __future__ import annotations

import math


class LossScaleTooSmall(FloatingPointError):
    """The loss scale fell below its minimum: training cannot continue in fp16."""


class LossScaler:
    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 2000, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, min_scale: float = 1.0, max_scale: float = 2.0 ** 24):
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"LossScaler: init_scale must be a finite number > 0, got {init_scale}")
        if growth_interval < 1:
            raise ValueError(f"LossScaler: growth_interval must be >= 1, got {growth_interval}")
        if not (growth_factor > 1 and 0 < backoff_factor < 1):
            raise ValueError("LossScaler: need growth_factor > 1 and 0 < backoff_factor < 1")
        if not 0 < min_scale <= init_scale <= max_scale:
            raise ValueError(f"LossScaler: need 0 < min_scale ({min_scale}) <= init_scale ({init_scale}) "
                             f"<= max_scale ({max_scale})")
        self.scale = float(init_scale)
        self.growth_interval, self.growth_factor, self.backoff_factor = int(growth_interval), float(growth_factor), float(backoff_factor)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.good_steps = 0     # clean steps since the last overflow or growth
        self.skipped = 0        # steps skipped for inf/NaN gradients, over the whole run
        self.grown = 0          # times the scale was doubled

    def update(self, found_inf: bool) -> bool:
        """Advance one step; True if the step's update should be applied."""
        if found_inf:
            self.skipped += 1
            self.good_steps = 0
            new = self.scale * self.backoff_factor
            if new < self.min_scale:
                raise LossScaleTooSmall(
                    f"fp16 loss scale would fall to {new:g}, below its minimum {self.min_scale:g}, after "
                    f"{self.skipped} skipped steps: the gradients overflow fp16 even unscaled. Train in "
                    f"dtype=bf16 (fp32's range) or fp32, or lower lr; loss_scale_min sets the floor.")
            self.scale = new
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.good_steps = 0
            if self.scale * self.growth_factor <= self.max_scale:
                self.scale *= self.growth_factor
                self.grown += 1
        return True

    def state(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped, "grown": self.grown,
                "growth_interval": self.growth_interval, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "min_scale": self.min_scale, "max_scale": self.max_scale}

    @classmethod
    def from_state(cls, s: dict) -> "LossScaler":
        out = cls(init_scale=s["scale"], growth_interval=s["growth_interval"], growth_factor=s["growth_factor"],
                  backoff_factor=s["backoff_factor"], min_scale=min(s["min_scale"], s["scale"]),
                  max_scale=max(s["max_scale"], s["scale"]))
        out.min_scale, out.max_scale = float(s["min_scale"]), float(s["max_scale"])
        out.good_steps, out.skipped, out.grown = int(s["good_steps"]), int(s["skipped"]), int(s.get("grown", 0))
        return out
