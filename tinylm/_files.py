"""Small file helpers shared by the checkpoint, model, tokenizer and data readers.

``read_json`` turns every way a JSON file can be unreadable (not UTF-8, not JSON) into one
ValueError that names the file, the line and the column, so each reader only checks the
structure it expects. ``sha256_file`` hashes a file in 1 MiB blocks (checkpoints and data
shards record it; readers compare it to detect truncation or corruption).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def read_json(path: str | os.PathLike, problem: str = "not valid JSON"):
    """The parsed JSON in ``path``; ValueError "<path>: <problem> (line L, column C: why)"."""
    raw = Path(path).read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {problem} (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {problem} (line {e.lineno}, column {e.colno}: {e.msg})") from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
