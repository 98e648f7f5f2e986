"""Training: exact resume, checkpoint integrity, NaN handling, logs and plots, config parsing,
and the CLI end to end. Every run is tiny and writes only under tmp_path."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tinylm.train import CheckpointError, load_checkpoint, load_model
from tinylm.config import apply_overrides, load_toml
from tinylm.train import TrainConfig, train


def make_corpus(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over lazy dog and cat runs to a red house while birds sing".split()
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = "\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(20))
        (path / f"doc{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def cfg_for(corpus, out, **kw):
    base = TrainConfig(data=[str(corpus)], out_dir=str(out), vocab_size=300, n_layer=1, n_head=2, n_embd=16,
                       block_size=16, batch_size=4, max_steps=12, warmup_steps=3, eval_interval=4, eval_batches=2,
                       log_interval=2, lr=1e-2, min_lr=1e-3, progress=False, sample_tokens=0)
    return replace(base, **kw)


def test_resume_gives_the_same_losses_as_a_straight_run(corpus, tmp_path):
    straight = train(cfg_for(corpus, tmp_path / "a"))
    assert straight["steps"] == 12
    first = train(cfg_for(corpus, tmp_path / "b"), max_steps=5)  # stop at 5 (writes a checkpoint)
    assert first["steps"] == 5 and load_checkpoint(tmp_path / "b" / "checkpoint")["step"] == 5
    resumed = train(cfg_for(corpus, tmp_path / "b"), resume=True)
    assert resumed["steps"] == 12
    np.testing.assert_array_equal(first["train_losses"] + resumed["train_losses"], straight["train_losses"])
    assert resumed["val"]["loss"] == straight["val"]["loss"]


def test_dropout_run_resumes_exactly(corpus, tmp_path):
    straight = train(cfg_for(corpus, tmp_path / "a", dropout=0.2, max_steps=6))
    train(cfg_for(corpus, tmp_path / "b", dropout=0.2, max_steps=6), max_steps=3)
    resumed = train(cfg_for(corpus, tmp_path / "b", dropout=0.2, max_steps=6), resume=True)
    np.testing.assert_array_equal(resumed["train_losses"], straight["train_losses"][3:])


def test_outputs_log_plot_and_loss_goes_down(corpus, tmp_path):
    res = train(cfg_for(corpus, tmp_path, max_steps=40, eval_interval=20))
    out = tmp_path
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("val_loss" in r and "val_ppl" in r and "val_bpb" in r for r in recs)
    assert all(np.isfinite(r["loss"]) for r in recs if "loss" in r)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["train_losses"][-1] < res["train_losses"][0] - 1.0
    v = res["val"]
    assert v["ppl"] == pytest.approx(np.exp(v["loss"])) and 0 < v["bpb"] < v["loss"] * 2
    model, tok = load_model(out / "checkpoint")
    text = tok.decode(model.generate(tok.encode("the "), 10, temperature=0.0).tolist())
    assert text.startswith("the ") and len(text) > 4


def test_truncated_or_corrupted_checkpoint_is_detected(corpus, tmp_path):
    train(cfg_for(corpus, tmp_path, max_steps=4))
    ck = tmp_path / "checkpoint"
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated or corrupted"):
        load_checkpoint(ck)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        train(cfg_for(corpus, tmp_path, max_steps=8), resume=True)
    (ck / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"state\.json: corrupted"):
        load_checkpoint(ck)
    (ck / "state.json").unlink()
    with pytest.raises(CheckpointError, match="no state.json"):
        load_model(ck)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    import tinylm.models.gpt as gpt

    cfg = cfg_for(corpus, tmp_path, max_steps=12)
    real = gpt.F.head_cross_entropy  # the loss training computes (the fused LM head + loss)
    calls = {"n": 0}

    def poisoned(x, w, targets, ignore_index=-100):
        calls["n"] += 1
        loss = real(x, w, targets, ignore_index)
        return loss * float("nan") if calls["n"] > 7 else loss  # train steps 1-4 + 2 val batches fine

    monkeypatch.setattr(gpt.F, "head_cross_entropy", poisoned)
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train(cfg)
    assert load_checkpoint(tmp_path / "checkpoint")["step"] == 4
    assert not list(tmp_path.glob("checkpoint*.tmp-*")) and not list(tmp_path.glob("checkpoints/*.tmp-*"))


def test_config_overrides_and_toml(tmp_path):
    cfg = apply_overrides(TrainConfig(), ["n_layer=6", "lr=1e-3", "dropout=0.1", "bias=false", "data=a.txt,b.txt"])
    assert (cfg.n_layer, cfg.lr, cfg.dropout, cfg.bias, cfg.data) == (6, 1e-3, 0.1, False, ["a.txt", "b.txt"])
    with pytest.raises(ValueError, match="unknown key 'n_layers'"):
        apply_overrides(TrainConfig(), ["n_layers=6"])
    with pytest.raises(ValueError, match="n_layer='six' is not a valid int"):
        apply_overrides(TrainConfig(), ["n_layer=six"])
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides(TrainConfig(), ["n_layer"])
    p = tmp_path / "c.toml"
    p.write_text('n_layer = 3\nlr = 0.002\nout_dir = "x"\n')
    assert load_toml(TrainConfig(), p).n_layer == 3
    p.write_text('n_layer = "3"\n')
    with pytest.raises(ValueError, match="n_layer must be int"):
        load_toml(TrainConfig(), p)
    p.write_text("n_layer = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_toml(TrainConfig(), p)


def test_example_configs_parse():
    root = Path(__file__).resolve().parents[1] / "examples" / "configs"
    files = sorted(root.glob("*.toml"))
    assert files, f"no example configs in {root}"
    for f in files:
        load_toml(TrainConfig(), f)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tinylm", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_cli_train_then_sample(corpus, tmp_path):
    r = run_cli("train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--max-steps", "6", "--no-progress",
                "vocab_size=300", "n_layer=1", "n_embd=16", "n_head=2", "block_size=16", "batch_size=4",
                "eval_interval=3", "eval_batches=1", "sample_tokens=20", "sample_prompt=the", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--- sample" in r.stdout and "val" in r.stdout
    r = run_cli("sample", "--ckpt", str(tmp_path / "run" / "checkpoint"), "--prompt", "the fox", "--max-new-tokens", "15",
                "--seed", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the fox") and len(r.stdout) > len("the fox") + 3
    r = run_cli("train", "--out", str(tmp_path / "x"), "n_layers=3", cwd=tmp_path)
    assert r.returncode == 2 and "unknown key 'n_layers'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("sample", "--ckpt", str(tmp_path / "nope"), cwd=tmp_path)
    assert r.returncode == 2 and "not a checkpoint" in r.stderr
    r = run_cli("train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "y"), cwd=tmp_path)
    assert r.returncode == 2 and "missing.txt: no such file" in r.stderr


def test_a_handful_of_files_still_gets_a_validation_split(tmp_path):
    few = make_corpus(tmp_path / "few", n_docs=3)
    res = train(cfg_for(few, tmp_path / "out", max_steps=2, eval_interval=2))
    assert res["steps"] == 2 and np.isfinite(res["val"]["loss"])
