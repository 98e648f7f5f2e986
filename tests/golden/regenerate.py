"""Regenerate the golden values of the tiny seeded GPT (``gpt_tiny.py`` says what they are).

    python tests/golden/regenerate.py           # compute, print what changed, write the file
    python tests/golden/regenerate.py --check   # compute and print what changed; write nothing

This is the only thing that writes ``tests/golden/gpt_tiny_v<N>.safetensors``; the tests only
read it. Run it when a change of the numbers is intended (and say why in the commit), never to
make a failing test pass without knowing what moved. It prints, per stored array, the largest
difference from the file on disk as a fraction of the array's largest magnitude (the unit the
tests' tolerances use) and marks those beyond the tolerance.

Format: safetensors (no pickle), float64 and float32 arrays keyed ``<dtype>/<what>``, and a
JSON ``scenario`` entry in its metadata recording the settings and library versions.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gpt_tiny  # noqa: E402


def scale_diff(new: np.ndarray, old: np.ndarray) -> float:
    """max |new - old| / max |old|: the tests' unit of tolerance."""
    return float(np.abs(new.astype(np.float64) - old.astype(np.float64)).max() / max(np.abs(old).max(), 1e-300))


def describe_changes(new: dict, old: dict) -> tuple[list[str], bool]:
    lines, changed = [], False
    for k in sorted(set(new) | set(old)):
        if k not in old:
            lines.append(f"  new      {k} {new[k].shape}")
            changed = True
        elif k not in new:
            lines.append(f"  removed  {k}")
            changed = True
        elif new[k].shape != old[k].shape or new[k].dtype != old[k].dtype:
            lines.append(f"  reshaped {k}: {old[k].dtype}{old[k].shape} -> {new[k].dtype}{new[k].shape}")
            changed = True
        else:
            d = scale_diff(new[k], old[k])
            tol = gpt_tiny.RTOL[k.split("/")[0]]
            mark = "CHANGED " if d > tol else ("moved   " if d > 0 else "same    ")
            changed |= d > tol
            lines.append(f"  {mark} {k}: max diff {d:.2e} of scale (tolerance {tol:.0e})")
    return lines, changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="print the differences, do not write")
    args = ap.parse_args(argv)

    from safetensors.numpy import load_file, save_file  # noqa: PLC0415

    import numba  # noqa: PLC0415
    import tinylm  # noqa: PLC0415

    path = HERE / gpt_tiny.FILE
    new = gpt_tiny.compute_all()
    if path.exists():
        lines, changed = describe_changes(new, load_file(str(path)))
        print(f"{path.name}: compared with the file on disk")
        print("\n".join(lines))
        print("beyond tolerance: " + ("yes" if changed else "no"))
    else:
        changed = True
        print(f"{path.name}: no file yet; {len(new)} arrays")
    if args.check:
        return 1 if changed else 0
    scenario = {
        "version": gpt_tiny.VERSION, "config": gpt_tiny.CONFIG, "model_seed": gpt_tiny.MODEL_SEED,
        "data_seed": gpt_tiny.DATA_SEED, "batch": [gpt_tiny.B, gpt_tiny.T], "steps": gpt_tiny.STEPS,
        "optim": {"lr": gpt_tiny.LR, "min_lr": gpt_tiny.MIN_LR, "warmup": gpt_tiny.WARMUP, "weight_decay": gpt_tiny.WD,
                  "betas": list(gpt_tiny.BETAS), "clip": gpt_tiny.CLIP},
        "generated_with": {"tinylm": tinylm.__version__, "numpy": np.__version__, "numba": numba.__version__,
                           "python": platform.python_version(), "machine": platform.machine()},
    }
    tmp = path.with_suffix(".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in new.items()}, str(tmp), metadata={"scenario": json.dumps(scenario)})
    tmp.replace(path)
    path.chmod(0o644)  # safetensors creates the file private; it is a tracked source file
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
