"""What is stored in which format, for a run's ``dtype`` and ``master_weights``.

How a 16-bit tensor exists here (kernels/__init__.py states it for the kernels): as an array at
the kernel boundary and as values in the parameter store. The engine's Tensors stay float32
(NumPy has no bfloat16 arithmetic, and a uint16 array under ``+`` would add integers), so in a
bf16 or fp16 run the Tensors hold values *of the format*: every weight the model computes with
is exactly representable in bf16/fp16, every weight gradient is rounded to the format as 16-bit
storage would round it (an fp16 gradient beyond 65504 is inf, one below 6e-8 is 0: what the
loss scaler exists for), and the compute is float32, as the kernels compute 16-bit inputs.

    kind          fp32 run          bf16 / fp16 run, master_weights   bf16, no master (stochastic rounding)
    weights       p: fp32           p: the working copy, fmt values    p: bf16 values (the only copy)
    master        -                 store.buffer("master"): fp32       -
    m, v          fp32              fp32                               fp32
    gradients     g: fp32           g: rounded to fmt, then unscaled,  g: rounded to bf16, then reduced
                                    reduced and clipped in fp32        and clipped in fp32

After each step AdamW has updated the fp32 master and the store refreshes the working copy
(round to nearest even), or, without a master, AdamW's fp32 result is rounded stochastically
back to bf16 (llm.c): an update smaller than half a bf16 step would otherwise round away every
time. Checkpoints hold the fp32 masters as the model's weights (and in the optimizer state), so
``tinylm sample`` and a resume read full precision.

What the engine does not yet do: keep activations in 16-bit between ops (that needs 16-bit
Tensors through tinylm/ops.py and tinylm/functional.py; the kernels already accept them), so
the memory a 16-bit run saves here is not the activations'. ``bytes_per_param`` reports both the
mixed-precision Adam accounting of the ZeRO paper (Rajbhandari et al. 2020, section 3.1: 2 + 2
+ 4 + 4 + 4 = 16 bytes) and what this store holds.
"""
from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Policy:
    dtype: str = "fp32"            # fp32, bf16 or fp16: the format of weights and weight gradients
    master_weights: bool = True    # keep fp32 masters (False: bf16 only, stochastic rounding)

    def __post_init__(self):
        if self.dtype not in FORMATS:
            raise ValueError(f"dtype must be one of {', '.join(FORMATS)}, got {self.dtype!r}")
        if not self.master_weights and self.dtype != "bf16":
            raise ValueError(f"master_weights=false is for dtype=bf16 (stochastic rounding), not {self.dtype}")

    @property
    def mixed(self) -> bool:
        return self.dtype != "fp32"

    @property
    def has_master(self) -> bool:
        return self.mixed and self.master_weights

    @property
    def stochastic(self) -> bool:
        return self.dtype == "bf16" and not self.master_weights

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == "fp16"

    def bytes_per_param(self) -> dict:
        """Bytes per parameter by kind in the format's own storage (the ZeRO accounting)."""
        if not self.mixed:
            return {"weights": 4, "master": 0, "moments": 8, "gradients": 4, "total": 16}
        w = 2
        master = 4 if self.has_master else 0
        return {"weights": w, "master": master, "moments": 8, "gradients": 2, "total": w + master + 8 + 2}

    def bytes_held(self, store) -> dict:
        """Bytes per parameter by kind as ``store`` holds them in this engine (weights and
        gradients as float32 arrays of the format's values)."""
        n = max(1, store.numel())
        nb = store.nbytes()
        out = {"weights": nb["params"] / n, "master": nb.get("master", 0) / n,
               "moments": (nb.get("m", 0) + nb.get("v", 0)) / n, "gradients": nb["grads"] / n}
        out["total"] = sum(out.values())
        return out
