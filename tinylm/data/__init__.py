"""tinylm.data: turn raw text into token shards that training reads.

    prepare(inputs, out_dir, tokenizer=None, ...) -> report      (pipeline.py)
    load_prepared(dir) -> PreparedData(.train, .val, .manifest, .tokenizer_path)   (shards.py)
    is_prepared_dir(path) -> bool

Modules: sources (inputs -> documents), clean (cleaning steps and filters), textscan (Numba
byte scans, MinHash), dedup (exact and near duplicates), shards (.npy shards and manifest),
pipeline (the pipeline: ``prepare``), report (the run report), cli (``tinylm prepare``).

Names are loaded on first use (PEP 562 ``__getattr__``) so that ``import tinylm.data.cli`` for
``tinylm --help`` pulls in neither NumPy nor Numba.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "prepare": "tinylm.data.pipeline",
    "format_report": "tinylm.data.report",
    "PrepareConfig": "tinylm.data.pipeline",
    "load_prepared": "tinylm.data.shards",
    "is_prepared_dir": "tinylm.data.shards",
    "PreparedData": "tinylm.data.shards",
    "TokenStream": "tinylm.data.shards",
    "CleanConfig": "tinylm.data.clean",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tinylm.data' has no attribute {name!r}")
