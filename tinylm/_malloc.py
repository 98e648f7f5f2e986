"""Keep freed memory for reuse: glibc ``mallopt`` so a training step does not page-fault.

Why: each step allocates the same activations and gradients again. glibc serves a request of
more than 128 KiB (its default, adjusted upward as blocks are freed) with a fresh ``mmap`` and
gives it back with ``munmap`` on free, and trims the top of the heap once 128 KiB are free
there; either way the next step's arrays land on new pages, and the kernel zero-fills every
page on first touch. Measured at config S (benchmarks/train_step.py, 2 cores): the forward
took 86.7 ms with the defaults and 60.7 ms with freed memory kept; peak RSS did not change
(258 vs 259 MiB: the steps reuse the same blocks).

``tune()`` raises the mmap threshold to glibc's ceiling (32 MiB on 64-bit: larger requests,
like the logits of a big vocabulary, still get their own mapping), and the trim threshold so
that up to 1 GiB of freed heap stays mapped. It is called at ``import tinylm``;
``TINYLM_MALLOC_TUNE=0`` leaves the allocator alone. A no-op where there is no glibc (macOS,
musl, Windows).

Leaves out: a caching allocator of our own (NumPy's allocator hooks need C code).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30
_done = {"ok": None}


def tune() -> bool:
    """Apply the settings once; True if glibc took them."""
    if _done["ok"] is not None:
        return _done["ok"]
    ok = False
    if os.environ.get("TINYLM_MALLOC_TUNE", "1").strip() != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _done["ok"] = ok
    return ok
