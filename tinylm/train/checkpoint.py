"""Checkpoints: a directory with ``model.safetensors``, ``optimizer.safetensors``,
``state.json`` and ``tokenizer.json``, switched into place atomically.

Layout of a run directory:

    out/checkpoints/step-0000250/     one directory per saved step (the newest ``keep`` kept)
    out/checkpoint -> checkpoints/step-0000250      a symbolic link: "the latest"

A save writes ``checkpoints/step-N.tmp-PID``, fsyncs every file and the directory, renames
it to ``step-N``, then points the ``checkpoint`` link at it by creating a new link and
renaming it over the old one (``os.replace`` of a link is one atomic step on POSIX). So at
every instant ``out/checkpoint`` names a complete checkpoint: the old one until the rename,
the new one after it. A crash leaves at most a temporary directory or an unreferenced step
directory, which ``clean_stale`` removes on the next run (saying what it removed).

``state.json`` records the SHA-256 of every other file; loading checks them, and checks the
structure of state.json itself, so a truncated, corrupted or hand-edited checkpoint is
reported as a ``CheckpointError`` naming the file and the problem. No pickle: arrays are
safetensors, everything else JSON.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from tinylm._files import read_json, sha256_file

FORMAT_VERSION = 1
FILES = ("model.safetensors", "optimizer.safetensors", "tokenizer.json")
_STEP_DIR = re.compile(r"^step-(\d+)(\.\d+)?$")
_TMP = re.compile(r"\.(tmp|new)-(\d+)$")
# what else a run writes beside its checkpoints through a temporary: the loss plot
# (train/plots.py) and the log cut back on resume (train/loop.py cut_log)
_RUN_TMP = re.compile(r"^(loss\.tmp-(\d+)\.png|log\.jsonl\.tmp-(\d+))$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and what is wrong."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's live process
        return True
    return True


def write_checkpoint_dir(target: Path, model, optimizer, meta: dict, tokenizer) -> None:
    """Write a complete checkpoint into the new directory ``target`` (fsync'd)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    target.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in model.state_dict().items()}, str(target / "model.safetensors"),
              metadata={"format": "pt"})
    opt_state = optimizer.state_dict() if optimizer is not None else {"step": np.zeros(1, np.int64)}
    save_file({k: np.ascontiguousarray(v) for k, v in opt_state.items()}, str(target / "optimizer.safetensors"))
    tokenizer.save(target / "tokenizer.json")
    for name in FILES:
        _fsync_file(target / name)
    state = dict(meta, format_version=FORMAT_VERSION, sha256={f: sha256_file(target / f) for f in FILES})
    with open(target / "state.json", "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(target)


def save_checkpoint(link: str | os.PathLike, model, optimizer, meta: dict, tokenizer, keep: int = 1) -> Path:
    """Save a checkpoint for step ``meta["step"]`` and point ``link`` (e.g. out/checkpoint) at
    it atomically; keep the newest ``keep`` step directories. Returns the step directory."""
    link = Path(link)
    root = link.parent / (link.name + "s")  # out/checkpoints
    root.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    name = f"step-{step:07d}"
    k = 1
    while (root / name).exists():  # the same step saved twice (e.g. an interrupt at a save step)
        name = f"step-{step:07d}.{k}"
        k += 1
    tmp = root / f"{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    write_checkpoint_dir(tmp, model, optimizer, meta, tokenizer)
    final = root / name
    tmp.rename(final)
    _fsync_dir(root)
    if link.exists() and not link.is_symlink():
        # a checkpoint directory from before the link layout: move it under checkpoints/ first
        legacy = root / f"legacy-{os.getpid()}"
        link.rename(legacy)
    new_link = link.parent / f"{link.name}.new-{os.getpid()}"
    if new_link.is_symlink() or new_link.exists():
        new_link.unlink()
    os.symlink(os.path.join(root.name, name), new_link)
    os.replace(new_link, link)  # the atomic switch
    _fsync_dir(link.parent)
    _prune(root, keep, final)
    return final


def _prune(root: Path, keep: int, current: Path) -> None:
    steps = sorted((p for p in root.iterdir() if p.is_dir() and (_STEP_DIR.match(p.name) or p.name.startswith("legacy-"))),
                   key=lambda p: p.stat().st_mtime_ns)
    old = [p for p in steps if p != current][: max(0, len(steps) - max(keep, 1))]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)


def clean_stale(out_dir: str | os.PathLike, link_name: str = "checkpoint") -> list[str]:
    """Remove what interrupted saves left in ``out_dir``: temporary checkpoint directories and
    links, loss plots and log rewrites of processes that are no longer running. Returns a line
    per removed path."""
    out = Path(out_dir)
    removed = []
    root = out / (link_name + "s")
    candidates = [(p, _TMP.search(p.name)) for p in (root.iterdir() if root.is_dir() else ())]
    for p in (out.iterdir() if out.is_dir() else ()):
        if p.name.startswith(link_name + "."):
            candidates.append((p, _TMP.search(p.name)))
        elif _RUN_TMP.match(p.name):
            candidates.append((p, _RUN_TMP.match(p.name)))
    for p, m in candidates:
        pid = m and next((g for g in m.groups()[1:] if g and g.isdigit()), None)
        if pid is None or _pid_alive(int(pid)):
            continue
        size = _du(p)
        if p.is_symlink() or p.is_file():
            p.unlink()
        else:
            shutil.rmtree(p, ignore_errors=True)
        removed.append(f"removed {p} ({size / 1e6:.1f} MB), left by an interrupted save")
    return removed


def _du(p: Path) -> int:
    if p.is_symlink() or p.is_file():
        return p.lstat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


_STATE_TYPES = {"step": int, "model_config": dict}
_TRAIN_TYPES = {"train_config": dict, "sampler": dict, "history": list}


def read_state(ckpt_dir: str | os.PathLike, for_training: bool = False) -> dict:
    """state.json, checked: present, JSON, the right version and structure, and every file's
    checksum. ``for_training`` also requires what a resume needs (config, sampler state)."""
    ckpt_dir = Path(ckpt_dir)
    sp = ckpt_dir / "state.json"
    if not sp.is_file():
        if not ckpt_dir.exists():
            raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint (no such directory)")
        raise CheckpointError(f"{ckpt_dir}: not a checkpoint (no state.json)")
    try:
        state = read_json(sp, "corrupted: not valid JSON")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{sp}: corrupted (expected a JSON object)")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{sp}: checkpoint format version {state.get('format_version')!r}, "
                              f"this tinylm reads {FORMAT_VERSION}")
    sums = state.get("sha256")
    if not isinstance(sums, dict):
        raise CheckpointError(f"{sp}: corrupted (no sha256 table)")
    for name in FILES:
        p = ckpt_dir / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing from the checkpoint")
        if sha256_file(p) != sums.get(name):
            raise CheckpointError(f"{p}: truncated or corrupted (its SHA-256 differs from the one in state.json)")
    need = dict(_STATE_TYPES, **(_TRAIN_TYPES if for_training else {}))
    for key, typ in need.items():
        if key not in state:
            raise CheckpointError(f"{sp}: corrupted (no {key!r})")
        v = state[key]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise CheckpointError(f"{sp}: {key!r} must be {typ.__name__}, got {type(v).__name__} {v!r}"[:300])
    if state["step"] < 0:
        raise CheckpointError(f"{sp}: 'step' must be >= 0, got {state['step']}")
    mt = state.get("model_type", "gpt")
    if not isinstance(mt, str):
        raise CheckpointError(f"{sp}: 'model_type' must be a string, got {mt!r}")
    if for_training:
        for i, h in enumerate(state["history"]):  # the loss curve: {"step": int, "train"/"val"/metric: number}
            ok = isinstance(h, dict) and isinstance(h.get("step"), int) and not isinstance(h["step"], bool) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in h.items() if k != "step")
            if not ok:
                raise CheckpointError(f"{sp}: history[{i}] must be {{'step': int, name: number, ...}}, got {h!r}"[:300])
    return state


def _load_arrays(path: Path) -> dict:
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_checkpoint(ckpt_dir: str | os.PathLike, for_training: bool = True) -> dict:
    """Everything to resume: state.json's fields plus ``model`` and ``optimizer`` arrays."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir, for_training=for_training)
    state["model"] = _load_arrays(ckpt_dir / "model.safetensors")
    state["optimizer"] = _load_arrays(ckpt_dir / "optimizer.safetensors")
    return state


def build_from_state(state: dict, ckpt_dir: Path):
    """The model a checkpoint's state describes, with its weights loaded."""
    from tinylm.models import model_class  # noqa: PLC0415

    sp = ckpt_dir / "state.json"
    try:
        model_cls, config_cls = model_class(state.get("model_type", "gpt"))
        model = model_cls(config_cls.from_dict(state["model_config"]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{sp}: model_type/model_config: {e}") from None
    load_weights(model, state["model"], ckpt_dir / "model.safetensors")
    return model


def load_weights(model, arrays: dict, path: Path) -> None:
    """Copy ``arrays`` into the model by name; any mismatch is a CheckpointError naming ``path``."""
    try:
        model.load_state_dict(arrays)
    except (KeyError, ValueError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CheckpointError(f"{path}: {msg}") from None


def load_tokenizer(ckpt_dir: str | os.PathLike):
    """The checkpoint's tokenizer; anything wrong with it is a CheckpointError naming the file."""
    from tinylm.tokenizer import BPETokenizer  # noqa: PLC0415

    path = Path(ckpt_dir) / "tokenizer.json"
    try:
        return BPETokenizer.load(path)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: {e}" if "tokenizer.json" not in str(e) else str(e)) from None


def load_model(ckpt_dir: str | os.PathLike):
    """(model, tokenizer) from a checkpoint, for sampling and evaluation."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    state["model"] = _load_arrays(ckpt_dir / "model.safetensors")
    model = build_from_state(state, ckpt_dir)
    tok = load_tokenizer(ckpt_dir)
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{ckpt_dir / 'tokenizer.json'}: {tok.vocab_size} tokens, more than the model's "
                              f"vocab_size={model.config.vocab_size}")
    return model.eval(), tok
