"""Token shards on disk: writing ``.npy`` shards, the JSON manifest, and reading them back.

A prepared directory holds::

    manifest.json          version, tokenizer (fingerprint, vocab size, eot id), dtype,
                           settings, report, and per split the list of shards
    tokenizer.json         the tokenizer the shards were made with
    train_000000.npy ...   1-D uint16 (vocab <= 65536) or uint32 token ids
    val_000000.npy ...

Each split is one token stream: every document is followed by the end-of-text token, and the
stream is cut into shards of ``shard_tokens`` tokens (the last one shorter), so a document may
straddle two shards; ``TokenStream`` makes the shards look like one array again. Shards are
read by memmap (``np.load(mmap_mode="r", allow_pickle=False)``): opening a 10 GB split costs
nothing until a window is sliced.

Leaves out: per-document offsets (an index of where each document starts) and compression.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylm._files import read_json, sha256_file

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT = "tinylm-prepared"
VERSION = 1
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def token_dtype(vocab_size: int):
    """uint16 when every id fits (ids < vocab_size <= 65536), else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class ShardWriter:
    """Append token ids to a split's stream; each full shard goes to disk as it fills."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.out_dir, self.split = Path(out_dir), split
        self.buf = np.empty(shard_tokens, dtype=dtype)
        self.fill = 0
        self.shards: list[dict] = []
        self.documents = 0
        self.tokens = 0

    def add_stream(self, ids: np.ndarray, documents: int) -> None:
        """Append ids that already hold ``documents`` documents, each followed by the eot id."""
        if ids.dtype != self.buf.dtype and ids.size and (ids.min() < 0 or ids.max() > np.iinfo(self.buf.dtype).max):
            raise ValueError(f"token id out of range for {self.buf.dtype}")
        self._put(ids)
        self.documents += documents

    def _put(self, arr: np.ndarray) -> None:
        pos = 0
        while pos < arr.shape[0]:
            take = min(arr.shape[0] - pos, self.buf.shape[0] - self.fill)
            self.buf[self.fill:self.fill + take] = arr[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.buf.shape[0]:
                self._flush()

    def _flush(self) -> None:
        if self.fill == 0:
            return
        name = f"{self.split}_{len(self.shards):06d}.npy"
        path = self.out_dir / name
        np.save(path, self.buf[:self.fill])
        self.shards.append({"file": name, "tokens": int(self.fill), "sha256": sha256_file(path)})
        self.tokens += self.fill
        self.fill = 0

    def close(self) -> list[dict]:
        self._flush()
        return self.shards


class TokenStream:
    """The shards of one split seen as one 1-D array: ``len()``, ``[i]`` and ``[i:j]`` (step 1).

    Slices return NumPy arrays (copied out of the memmaps, concatenated across shard edges).
    """

    def __init__(self, arrays: list):
        self.arrays = arrays
        self.offsets = np.cumsum([0] + [a.shape[0] for a in arrays])
        self.dtype = arrays[0].dtype if arrays else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise ValueError("TokenStream slices take step 1 only")
            if stop <= start:
                return np.empty(0, dtype=self.dtype)
            first = int(np.searchsorted(self.offsets, start, side="right")) - 1
            parts = []
            k = first
            while k < len(self.arrays) and self.offsets[k] < stop:
                lo = max(start - self.offsets[k], 0)
                hi = min(stop - self.offsets[k], self.arrays[k].shape[0])
                parts.append(np.asarray(self.arrays[k][lo:hi]))
                k += 1
            return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
        i = int(key)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {key} out of range for a stream of {n} tokens")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.arrays[k][i - self.offsets[k]]

    def __repr__(self) -> str:
        return f"TokenStream({len(self)} tokens, {len(self.arrays)} shards, {self.dtype})"


@dataclass
class PreparedData:
    path: Path
    manifest: dict
    train: TokenStream
    val: TokenStream
    tokenizer_path: Path

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.manifest["tokenizer"]["eot_id"])


def write_manifest(out_dir: Path, manifest: dict) -> None:
    tmp = Path(out_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, Path(out_dir) / MANIFEST)


def read_manifest(path) -> dict:
    """Parse and check a manifest; ValueError with a clear message when it is not one."""
    mpath = Path(path) / MANIFEST
    manifest = read_json(mpath, "not a valid manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: not a tinylm prepared-data manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{mpath}: manifest version {manifest.get('version')!r}, this tinylm reads {VERSION}")
    if manifest.get("dtype") not in _DTYPES:
        raise ValueError(f"{mpath}: unknown dtype {manifest.get('dtype')!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, dict) or not all(isinstance(shards.get(s), list) for s in ("train", "val")):
        raise ValueError(f"{mpath}: 'shards' must list 'train' and 'val' shards")
    return manifest


def is_prepared_dir(path) -> bool:
    """True when ``path`` holds a readable prepared-data manifest."""
    try:
        read_manifest(path)
        return True
    except (OSError, ValueError):
        return False


def _open_split(root: Path, entries: list, dtype) -> TokenStream:
    arrays = []
    for e in entries:
        name = e.get("file") if isinstance(e, dict) else None
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"{root / MANIFEST}: bad shard entry {e!r}")
        arr = np.load(root / name, mmap_mode="r", allow_pickle=False)
        if arr.ndim != 1 or arr.dtype != dtype or arr.shape[0] != e.get("tokens"):
            raise ValueError(f"{root / name}: expected {e.get('tokens')} {np.dtype(dtype).name} tokens, "
                             f"found shape {arr.shape} {arr.dtype}")
        arrays.append(arr)
    stream = TokenStream(arrays)
    stream.dtype = np.dtype(dtype)
    return stream


def load_prepared(path) -> PreparedData:
    """Open a prepared directory: manifest checked, shards memory-mapped, lengths verified."""
    root = Path(path)
    manifest = read_manifest(root)
    dtype = _DTYPES[manifest["dtype"]]
    train = _open_split(root, manifest["shards"]["train"], dtype)
    val = _open_split(root, manifest["shards"]["val"], dtype)
    tok = root / TOKENIZER
    if not tok.is_file():
        raise ValueError(f"{root}: {TOKENIZER} is missing")
    return PreparedData(root, manifest, train, val, tok)
