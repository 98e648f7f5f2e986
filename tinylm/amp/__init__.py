"""Mixed precision: 16-bit storage formats, the fp16 loss scaler, and the policy of what is
stored in which format.

- ``formats``: bf16 (uint16 top halves of float32) and fp16 (NumPy float16), converted to and
  from float32 (round to nearest even; stochastic rounding for bf16 weights without a master).
- ``scaler``: the dynamic loss scaler for fp16, a state machine with no tensors in it.
- ``policy``: for a run's ``dtype`` (fp32, bf16, fp16) and ``master_weights``: where the
  weights, their masters, the moments and the gradients live and in which format, and the
  bytes per parameter that follow.

The training loop (tinylm/train/loop.py) drives them; the flat ParamStore owns the buffers.
"""
# formats imports Numba (its conversions are Numba kernels): import it as tinylm.amp.formats;
# the policy and the scaler are plain Python, cheap to import with the training loop
from tinylm.amp.policy import FORMATS, Policy
from tinylm.amp.scaler import LossScaler, LossScaleTooSmall

__all__ = ["FORMATS", "LossScaleTooSmall", "LossScaler", "Policy"]
