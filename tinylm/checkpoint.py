"""Checkpoints: a directory with ``model.safetensors``, ``optimizer.safetensors``,
``state.json`` and ``tokenizer.json``.

Written to a temporary directory beside the target and renamed into place, so a crash at any
moment leaves either the previous checkpoint or the new one, never a half-written one under
the checkpoint's name. ``state.json`` records the SHA-256 of every other file; loading checks
them, so a truncated or corrupted file is reported by name instead of loading garbage.
No pickle: arrays are safetensors, everything else JSON.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from tinylm._files import read_json, sha256_file

FORMAT_VERSION = 1
FILES = ("model.safetensors", "optimizer.safetensors", "tokenizer.json")


def save_checkpoint(ckpt_dir: str | os.PathLike, model, optimizer, meta: dict, tokenizer) -> None:
    from safetensors.numpy import save_file  # noqa: PLC0415

    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    save_file({k: np.ascontiguousarray(v) for k, v in optimizer.state_dict().items()}, str(tmp / "optimizer.safetensors"))
    tokenizer.save(tmp / "tokenizer.json")
    state = dict(meta, format_version=FORMAT_VERSION, sha256={f: sha256_file(tmp / f) for f in FILES})
    with open(tmp / "state.json", "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    old = ckpt_dir.with_name(ckpt_dir.name + f".old-{os.getpid()}")
    if ckpt_dir.exists():
        ckpt_dir.rename(old)
    tmp.rename(ckpt_dir)
    if old.exists():
        shutil.rmtree(old)


def read_state(ckpt_dir: str | os.PathLike) -> dict:
    """state.json, checked: present, JSON, the right version, and every file's checksum."""
    ckpt_dir = Path(ckpt_dir)
    sp = ckpt_dir / "state.json"
    if not sp.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint (no state.json)")
    state = read_json(sp, "corrupted: not valid JSON")
    if not isinstance(state, dict):
        raise ValueError(f"{sp}: corrupted (expected a JSON object)")
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{sp}: checkpoint format version {state.get('format_version')!r}, this tinylm reads {FORMAT_VERSION}")
    sums = state.get("sha256")
    if not isinstance(sums, dict):
        raise ValueError(f"{sp}: corrupted (no sha256 table)")
    for name in FILES:
        p = ckpt_dir / name
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing from the checkpoint")
        if sha256_file(p) != sums.get(name):
            raise ValueError(f"{p}: truncated or corrupted (its SHA-256 differs from the one in state.json)")
    for key in ("step", "model_config"):
        if key not in state:
            raise ValueError(f"{sp}: corrupted (no {key!r})")
    return state


def load_checkpoint(ckpt_dir: str | os.PathLike) -> dict:
    """Everything to resume: state.json's fields plus ``model`` and ``optimizer`` arrays."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    state["model"] = load_file(str(ckpt_dir / "model.safetensors"))
    state["optimizer"] = load_file(str(ckpt_dir / "optimizer.safetensors"))
    return state


def load_model(ckpt_dir: str | os.PathLike):
    """(model, tokenizer) from a checkpoint, for sampling and evaluation."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    from tinylm.models import GPT, GPTConfig  # noqa: PLC0415
    from tinylm.tokenizer import BPETokenizer  # noqa: PLC0415

    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    model = GPT(GPTConfig.from_dict(state["model_config"]))
    model.load_state_dict(load_file(str(ckpt_dir / "model.safetensors")))
    return model.eval(), BPETokenizer.load(ckpt_dir / "tokenizer.json")
