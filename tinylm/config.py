"""Configuration: dataclasses with commented defaults, TOML files, ``key=value`` overrides.

nanoGPT's configurator ``exec``s files into globals and calls itself "a terrible idea"; this
keeps its good parts (an override must name a known key and fit the default's type) and drops
the exec: TOML is parsed by ``tomllib`` and values are checked field by field.

>>> from dataclasses import dataclass
>>> @dataclass
... class C:
...     lr: float = 1e-3
...     steps: int = 10
>>> apply_overrides(C(), ["lr=3e-4", "steps=20"])
C(lr=0.0003, steps=20)
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any


def _coerce(name: str, value: Any, field_type: str, where: str, from_text: bool):
    """Check (and, for strings from the command line, convert) a value against a field."""
    t = field_type.replace(" ", "")
    optional = t.endswith("|None") or t.startswith("None|")
    base = t.replace("|None", "").replace("None|", "")
    if value is None or (from_text and isinstance(value, str) and value.lower() == "none"):
        if optional:
            return None
        raise ValueError(f"{where}: {name} cannot be None")
    if from_text and isinstance(value, str) and base != "str":
        s = value.strip()
        try:
            if base == "bool":
                if s.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return s.lower() in ("true", "1", "yes")
            if base == "int":
                return int(s)
            if base == "float":
                return float(s)
            if base.startswith(("list", "tuple")):
                return [x for x in s.split(",") if x]
        except ValueError:
            raise ValueError(f"{where}: {name}={value!r} is not a valid {base}") from None
    ok = {
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
    }.get(base, lambda v: isinstance(v, (list, tuple)) if base.startswith(("list", "tuple")) else True)
    if not ok(value) or (base == "list[str]" and not all(isinstance(x, str) for x in value)):
        raise ValueError(f"{where}: {name} must be {base}, got {type(value).__name__} {value!r}"[:300])
    return float(value) if base == "float" else value


def apply_dict(cfg, values: dict, where: str = "config", from_text: bool = False, sources: dict | None = None):
    """A copy of dataclass ``cfg`` with ``values`` applied; unknown keys are an error.
    ``from_text``: values are command-line strings, converted to each field's type.
    ``sources``: if given, ``sources[key] = where`` for every key set here (so a later check
    can say where a bad value came from)."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(fields))}")
        f = fields[key]
        changes[key] = _coerce(key, value, str(f.type), where, from_text)
        if sources is not None:
            sources[key] = where
    return dataclasses.replace(cfg, **changes)


def apply_overrides(cfg, overrides: list[str], sources: dict | None = None):
    """Apply ``key=value`` strings (from the command line) to a dataclass."""
    values = {}
    for item in overrides:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value")
        values[key.replace("-", "_")] = value
    return apply_dict(cfg, values, where="override", from_text=True, sources=sources)


_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def split_overrides(argv: list[str], takes_one: set[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from the rest of a command line, wherever they stand.

    ``tinylm train --data corpus.txt n_layer=2 --max-steps 5 lr=1e-3`` -> (["--data",
    "corpus.txt", "--max-steps", "5"], ["n_layer=2", "lr=1e-3"]). A word right after an option
    that takes one value (``takes_one``, e.g. --out) is that option's value, and an existing
    file whose name looks like key=value stays a path.

    >>> split_overrides(["--data", "a.txt", "n_layer=2", "--out", "x=y"], {"--out"})
    (['--data', 'a.txt', '--out', 'x=y'], ['n_layer=2'])
    """
    rest, overrides = [], []
    prev = None
    for word in argv:
        if prev in takes_one or not _OVERRIDE.match(word) or Path(word).exists():
            rest.append(word)
        else:
            overrides.append(word)
        prev = word
    return rest, overrides


def load_toml(cfg, path: str | Path, sources: dict | None = None):
    """Apply a TOML file's top-level keys to a dataclass."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    return apply_dict(cfg, data, where=f"file {path}", sources=sources)


def from_layers(cfg, config_file, overrides: list[str], flags: dict):
    """The settings of a command, layer by layer: ``cfg``'s defaults, then the TOML file
    ``config_file`` (if any), then ``key=value`` overrides, then command-line flags (a flag
    whose value is None was not given). Returns (cfg, sources): where each key was set."""
    sources: dict = {}
    if config_file:
        cfg = load_toml(cfg, config_file, sources)
    cfg = apply_overrides(cfg, overrides, sources)
    given = {k: v for k, v in flags.items() if v is not None}
    return apply_dict(cfg, given, where="command line", sources=sources), sources

