"""Golden end-to-end values of a tiny seeded GPT, and overfitting one batch.

The scenario (model, batch, optimizer settings) is ``tests/golden/gpt_tiny.py``; the values are
in ``tests/golden/gpt_tiny_v1.safetensors``, written only by ``tests/golden/regenerate.py``.
These tests recompute everything and compare: logits, loss and every parameter's gradient at
step 0, and the losses and gradient norms of the first 10 AdamW steps, in float64 and float32.
Tolerances are ``gpt_tiny.RTOL`` (as a fraction of each array's largest magnitude), justified
there by measurement.

A golden file only says "nothing moved"; two tests here also say the stored numbers are right:
the float64 gradients against central finite differences of the float64 loss, and float32
against float64.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN_DIR))
import gpt_tiny  # noqa: E402
import regenerate  # noqa: E402

from tinylm.models import GPT, GPTConfig  # noqa: E402
from tinylm.optim import AdamW  # noqa: E402

GOLDEN_PATH = GOLDEN_DIR / gpt_tiny.FILE


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    assert GOLDEN_PATH.is_file(), f"{GOLDEN_PATH} is missing: run python tests/golden/regenerate.py"
    return load_file(str(GOLDEN_PATH))


def assert_close_to_scale(new, old, rtol: float, what: str):
    """|new - old| <= rtol * max|old| everywhere."""
    new, old = np.asarray(new, np.float64), np.asarray(old, np.float64)
    assert new.shape == old.shape, f"{what}: shape {new.shape} vs golden {old.shape}"
    d = np.abs(new - old).max() / np.abs(old).max()
    assert d <= rtol, f"{what}: differs from the golden value by {d:.2e} of its scale (tolerance {rtol:.0e})"


def test_golden_file_describes_this_scenario(golden):
    with safe_open(str(GOLDEN_PATH), "np") as f:
        meta = json.loads(f.metadata()["scenario"])
    assert meta["version"] == gpt_tiny.VERSION
    assert meta["config"] == gpt_tiny.CONFIG
    assert (meta["model_seed"], meta["data_seed"], meta["steps"]) == (gpt_tiny.MODEL_SEED, gpt_tiny.DATA_SEED, gpt_tiny.STEPS)
    names = [n for n, _ in GPT(GPTConfig(**gpt_tiny.CONFIG)).named_parameters()]
    expected = {f"{dt}/{k}" for dt in gpt_tiny.DTYPES
                for k in ["logits", "loss", "train_losses", "grad_norms"] + [f"grad/{n}" for n in names]}
    assert set(golden) == expected
    for dt in gpt_tiny.DTYPES:
        assert golden[f"{dt}/logits"].dtype == np.dtype(dt)
        assert golden[f"{dt}/train_losses"].shape == (gpt_tiny.STEPS,)


@pytest.mark.parametrize("dtype", gpt_tiny.DTYPES)
def test_matches_golden(golden, dtype):
    new = gpt_tiny.compute(dtype)
    assert set(new) == {k for k in golden if k.startswith(dtype + "/")}
    for k in sorted(new):
        assert_close_to_scale(new[k], golden[k], gpt_tiny.RTOL[dtype], k)


def test_golden_is_not_degenerate(golden):
    """The scenario exercises what it claims: training lowers the loss, clipping engages on
    some steps and not on others, and no gradient is all zeros."""
    losses = golden["float64/train_losses"]
    assert np.isclose(losses[0], golden["float64/loss"][0])
    assert losses[-1] < losses[0] - 0.5
    norms = golden["float64/grad_norms"]
    assert (norms > gpt_tiny.CLIP).any() and (norms < gpt_tiny.CLIP).any()
    for k, v in golden.items():
        if "/grad/" in k:
            assert np.abs(v).max() > 0, k


def test_float32_agrees_with_float64(golden):
    """Same seed, same init (drawn in float64, then cast): float32 tracks float64 within the
    float32 tolerance, through 10 optimizer steps."""
    for k in golden:
        if k.startswith("float32/"):
            assert_close_to_scale(golden[k], golden["float64/" + k[len("float32/"):]], gpt_tiny.RTOL["float32"], k)


def test_golden_gradients_match_finite_differences(golden):
    """Central differences of the float64 loss at a few entries of every parameter. Step 1e-5:
    truncation error ~h^2 * |f'''| ~ 1e-10, rounding ~1e-16 / 1e-5 = 1e-11; tolerance 1e-7."""
    model = GPT(GPTConfig(**gpt_tiny.CONFIG, dtype="float64"), seed=gpt_tiny.MODEL_SEED)
    x, y = gpt_tiny.batch()
    rng = np.random.default_rng(0)
    h = 1e-5
    for name, p in model.named_parameters():
        g = golden[f"float64/grad/{name}"]
        flat = p.data.reshape(-1)  # a view: editing it edits the parameter
        # the largest-gradient entry (so a scale error shows) and two random ones
        picks = [int(np.abs(g).argmax())] + list(rng.integers(0, flat.size, 2))
        for i in picks:
            orig = flat[i]
            flat[i] = orig + h
            lp = model(x, y)[1].item()
            flat[i] = orig - h
            lm = model(x, y)[1].item()
            flat[i] = orig
            fd = (lp - lm) / (2 * h)
            assert abs(fd - g.reshape(-1)[i]) < 1e-7, f"{name}[{i}]: finite difference {fd}, golden {g.reshape(-1)[i]}"


def test_regenerate_reports_a_change(golden):
    """The script's comparison flags a moved value as CHANGED and an identical one as same."""
    moved = dict(golden)
    moved["float64/loss"] = golden["float64/loss"] * (1 + 1e-6)
    lines, changed = regenerate.describe_changes(moved, golden)
    assert changed
    assert any("CHANGED" in ln and "float64/loss" in ln for ln in lines)
    assert any(ln.split()[0] == "same" and "float64/logits" in ln for ln in lines)
    lines, changed = regenerate.describe_changes(dict(golden), golden)
    assert not changed


def test_overfits_one_batch():
    """Memorising 32 random next-tokens is within reach of a 2-layer model: the loss falls from
    ~ln(32) = 3.47 to near zero and every argmax equals its target."""
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=8, vocab_size=32), seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 32, (4, 8)), rng.integers(0, 32, (4, 8))
    opt = AdamW(model.param_groups(0.0), lr=1e-2)
    first = None
    for _ in range(80):
        opt.zero_grad()
        logits, loss = model(x, y)
        loss.backward()
        first = loss.item() if first is None else first
        opt.clip_grad_norm(1.0)
        opt.step()
    logits, loss = model(x, y)
    assert first > 3.0
    assert loss.item() < 0.01, f"loss after 80 steps on one batch: {loss.item()}"
    assert (logits.data.argmax(-1) == y).all()
