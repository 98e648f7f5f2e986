"""Mixed-precision training: fp16 with the loss scaler resumes exactly, bf16 with and without
fp32 masters trains, the store keeps masters and working copy apart, and fp32 is unchanged.

Every run is tiny (1 layer, 16 wide) and writes only under tmp_path."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train import cfg_for, make_corpus  # noqa: E402

from kernels._formats import f32_to_bf16, bf16_to_f32  # noqa: E402
from tinylm.optim import AdamW, ParamStore  # noqa: E402
from tinylm.tensor import Tensor  # noqa: E402
from tinylm.train import load_checkpoint, train  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def log(out):
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


def is_bf16(a):
    return np.array_equal(bf16_to_f32(f32_to_bf16(a)), a)


def is_fp16(a):
    return np.array_equal(a.astype(np.float16).astype(np.float32), a)


def test_fp16_with_loss_scaling_resumes_exactly(corpus, tmp_path):
    # scale 2^20 overflows fp16 gradients at once: the first steps are skipped and halve it;
    # growth every 3 clean steps overflows again: skips, halvings and growths all cross the resume
    kw = dict(dtype="fp16", loss_scale_init=2.0 ** 20, loss_scale_window=3)
    straight = train(cfg_for(corpus, tmp_path / "a", **kw))
    train(cfg_for(corpus, tmp_path / "b", **kw), max_steps=5)
    resumed = train(cfg_for(corpus, tmp_path / "b", **kw), resume=True)
    np.testing.assert_array_equal(resumed["train_losses"], straight["train_losses"][5:])
    assert resumed["val"]["loss"] == straight["val"]["loss"]
    recs = [r for r in log(tmp_path / "a") if "loss" in r]
    assert recs[0]["skipped_steps"] >= 1 and recs[0]["loss_scale"] < 2.0 ** 30
    assert recs[-1]["skipped_steps"] > recs[0]["skipped_steps"]  # growth overflowed again later
    def scale_log(out):  # (step, scale, skipped) of each step logged (b logs its stop at step 5 too)
        return {(r["step"], r["loss_scale"], r["skipped_steps"]) for r in log(out) if "loss" in r}
    assert scale_log(tmp_path / "a") <= scale_log(tmp_path / "b")
    sa = load_checkpoint(tmp_path / "a" / "checkpoint")
    sb = load_checkpoint(tmp_path / "b" / "checkpoint")
    assert sa["amp"] == sb["amp"] and sa["amp"]["dtype"] == "fp16"
    for k in sa["optimizer"]:
        np.testing.assert_array_equal(sa["optimizer"][k], sb["optimizer"][k])
    # the checkpoint's weights are the fp32 masters (not all fp16 values), as in the optimizer
    w = sa["model"]["wte.weight"]
    assert not is_fp16(w)
    assert any(np.array_equal(w.reshape(-1), m[:w.size]) for k, m in sa["optimizer"].items() if k.endswith("master"))


def test_loss_scale_floor_stops_the_run_with_a_message(corpus, tmp_path):
    with pytest.raises(FloatingPointError, match="loss scale would fall"):
        train(cfg_for(corpus, tmp_path, dtype="fp16", loss_scale_init=2.0 ** 40, loss_scale_min=2.0 ** 39))


@pytest.mark.parametrize("master", [True, False])
def test_bf16_trains_with_and_without_masters(corpus, tmp_path, master):
    fp32 = train(cfg_for(corpus, tmp_path / "fp32"))
    r = train(cfg_for(corpus, tmp_path / "bf16", dtype="bf16", master_weights=master))
    assert r["train_losses"][-1] < r["train_losses"][0] - 1.0
    assert abs(r["val"]["loss"] - fp32["val"]["loss"]) < 0.02 * fp32["val"]["loss"]
    model = r["model"]  # the model as it ended training: the working copy, bf16 values
    assert all(is_bf16(p.values()) for _, p in model.named_parameters())
    # with masters the working copy is 16-bit storage (2 bytes a weight); without, float32 of bf16 values
    assert all((p.fmt == "bf16" and p.data.dtype == np.uint16) == master for _, p in model.named_parameters())
    w = load_checkpoint(tmp_path / "bf16" / "checkpoint")["model"]["h.0.mlp.c_fc.weight"]
    assert is_bf16(w) != master  # masters: fp32 in the checkpoint; without: the bf16 weights


def test_fp32_run_is_unchanged(corpus, tmp_path):
    state = load_checkpoint(Path(train(cfg_for(corpus, tmp_path, max_steps=4))["checkpoint"]))
    assert "amp" not in state and not any(k.endswith("master") for k in state["optimizer"])
    assert not any("loss_scale" in r for r in log(tmp_path))


def test_store_masters_working_copy_and_adamw_state():
    rng = np.random.default_rng(0)
    ps = [Tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True) for s in ((5, 7), (7,))]
    exact = [p.data.copy() for p in ps]
    store = ParamStore(ps)
    store.set_format("bf16")
    master = store.buffer("master")[0]
    np.testing.assert_array_equal(master, np.concatenate([e.reshape(-1) for e in exact]))
    assert not is_bf16(master)
    # the working copy: 16-bit storage, of which the parameters are views tagged bf16
    assert all(p.fmt == "bf16" and p.data.dtype == np.uint16 and is_bf16(p.values()) for p in ps)
    assert all(np.shares_memory(p.data, store.groups[0].p) for p in ps)
    opt = AdamW(store, lr=1e-3)
    for p in ps:
        p.grad[...] = 1.0
    opt.step()
    assert not np.array_equal(master, np.concatenate([e.reshape(-1) for e in exact]))  # it moved
    np.testing.assert_array_equal(store.groups[0].p, f32_to_bf16(master))  # refreshed: the masters rounded
    assert store.buffer("m")[0].dtype == store.buffer("v")[0].dtype == np.float32  # fp32 moments
    sd = opt.state_dict()
    assert "group0.master" in sd
    with store.masters_in_params():  # what a checkpoint writes: the fp32 masters as the weights
        assert all(p.fmt is None for p in ps)
        np.testing.assert_array_equal(np.concatenate([p.data.reshape(-1) for p in ps]), master)
    assert all(p.fmt == "bf16" and np.shares_memory(p.data, store.groups[0].p) for p in ps)
    held = store.nbytes()
    assert held["master"] == 4 * store.numel() and held["params"] == 2 * store.numel()
    with pytest.raises(RuntimeError, match="already"):
        store.set_format("fp16")
