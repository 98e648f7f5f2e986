"""Byte-level BPE tokenizer (GPT-2 style): a fast Numba trainer and encoder, GPT-2 file import/export.

``from tinylm.tokenizer import BPETokenizer`` is the whole public surface; see ``bpe.py`` for the
model and file format, ``train.py`` for the training rule, ``_pretok.py`` / ``_merge.py`` /
``_encode.py`` for the Numba kernels and ``gpt2.py`` for GPT-2's byte table and files.
Importing this package does not import Numba; the first train/encode does.
"""
from tinylm.tokenizer.bpe import BPETokenizer
from tinylm.tokenizer.gpt2 import GPT2_PATTERN

__all__ = ["BPETokenizer", "GPT2_PATTERN"]
