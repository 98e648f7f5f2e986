"""What is stored in which format, for a run's ``dtype`` and ``master_weights``.

How a 16-bit tensor exists here: a Tensor with ``fmt="bf16"`` holds bf16 bits in a uint16 array
(NumPy has no bfloat16), one with ``fmt="fp16"`` a float16 array. Every op computes in float32:
the engine decodes a 16-bit input to a float32 temporary first (exact), and under
``autocast(fmt)`` (tinylm/tensor.py) stores each layer's output in the format, and keeps what
an op saves for its backward in the format too. So a bf16/fp16 run holds its activations, and
its working copy of the weights, at 2 bytes a value; gradients stay float32.

    kind          fp32 run          bf16 / fp16 run, master_weights   bf16, no master (stochastic rounding)
    weights       p: fp32           p: the working copy, 16-bit        p: fp32 array of bf16 values (the
                                    storage (the store's 16-bit        only copy: AdamW updates it in fp32
                                    buffer, the Parameters' views)     and rounds it stochastically)
    master        -                 store.buffer("master"): fp32       -
    m, v          fp32              fp32                               fp32
    gradients     g: fp32           g: fp32, rounded to fmt (as        g: rounded to bf16, then reduced
                                    16-bit storage would round them),  and clipped in fp32
                                    unscaled, reduced, clipped in fp32
    activations   fp32              16-bit (autocast)                  16-bit (autocast)

After each step AdamW has updated the fp32 master and the store refreshes the working copy
(round to nearest even), or, without a master, AdamW's fp32 result is rounded stochastically
back to bf16 (llm.c): an update smaller than half a bf16 step would otherwise round away every
time. Checkpoints hold the fp32 masters as the model's weights (and in the optimizer state), so
``tinylm sample`` and a resume read full precision.

Bytes per parameter: the ZeRO paper's mixed-precision Adam accounting (Rajbhandari et al. 2020,
section 3.1) is 2 + 2 + 4 + 4 + 4 = 16 (16-bit weights and gradients, fp32 master and
moments); this store holds 2 + 4 + 4 + 4 + 4 = 18, its gradients being fp32 (they are
accumulated by the GEMMs, unscaled and clipped in fp32, as the issue's design asks), and fp32
training holds 4 + 4 + 4 + 4 = 16. What a 16-bit run saves here is therefore the activations'
half, not parameter state: the saving grows with the batch. On several ranks the ZeroOptimizer
keeps its own layout (tinylm/distributed/zero.py). ``bytes_per_param`` reports the paper's
accounting, ``bytes_held`` what this store holds.
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
        """Bytes per parameter by kind as ``store`` holds them (a 16-bit working copy with
        masters; float32 gradients)."""
        n = max(1, store.numel())
        nb = store.nbytes()
        out = {"weights": nb["params"] / n, "master": nb.get("master", 0) / n,
               "moments": (nb.get("m", 0) + nb.get("v", 0)) / n, "gradients": nb["grads"] / n}
        out["total"] = sum(out.values())
        return out
