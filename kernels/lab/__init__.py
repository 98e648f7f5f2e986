"""Kernel labs: the variants kept for study or as fallbacks, out of the path a reader follows.

Like llm.c's ``dev/cuda``: ``kernels/<family>.py`` holds the reference, the variant that runs and
the GPU kernel; ``kernels/lab/<family>.py`` holds the others (the textbook and tiled attention,
the batched-BLAS attention that is also cpu_gemm's fallback, the hand-written matmul and its
shared-memory GPU twin), each with the history that explains why it lost. Every lab variant is
still checked against the family's reference (tests/test_kernels_*.py, ``python -m
kernels._gpucheck``) and timed (benchmarks/kernels.py), through the tables below.

- ``kernels.lab.<family>.VARIANTS`` is the family's whole table: ``kernels.<family>.VARIANTS``
  extended by the lab's variants; ``python -m kernels.lab.<family>`` checks and times them.
- ``variants(family)`` / ``gpu_kernels_for_ptx(family)``: the whole table and every GPU kernel of
  any family, lab or not (what the checkers and the benchmark iterate over).

A lab module imports the family module (for the reference and shared helpers); the family
module imports its lab only inside the function that needs a fallback, so ``import
kernels.attention`` does not load the lab.
"""
from __future__ import annotations

import importlib

FAMILIES = ("attention", "matmul")  # families that have a lab module


def _module(family: str):
    lab = family in FAMILIES
    return importlib.import_module(f"kernels.lab.{family}" if lab else f"kernels.{family}")


def variants(family: str) -> dict:
    """op -> {variant name: function}: every variant of the family, the lab's included."""
    return _module(family).VARIANTS


def gpu_kernels_for_ptx(family: str) -> list:
    """(name, python function, float32 signature) of every GPU kernel of the family."""
    return _module(family).gpu_kernels_for_ptx()
