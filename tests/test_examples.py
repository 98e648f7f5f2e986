"""The examples run, and their configs are valid.

Every ``examples/configs/*.toml`` loads into ``TrainConfig`` (unknown keys and wrong types are
errors there) and describes a valid model. Each example script is run through its ``main``
on data the test writes under tmp_path, shrunk with ``examples/configs/tiny.toml`` and
``key=value`` overrides so the whole file runs in well under a minute: gpt2_sample.py on a tiny
GPT-2 directory (saved by ``save_hf``, tokenizer written as vocab.json + merges.txt) must print
exactly what ``generate`` gives for the same seed; shakespeare.py and stdlib.py train a few
steps and print a sample. Missing inputs give a message and exit code 2.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tinylm.config import load_toml
from tinylm.models import GPT, GPTConfig
from tinylm.train import TrainConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = EXAMPLES / "configs" / "tiny.toml"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", sorted((EXAMPLES / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_config_loads_and_builds_a_model(path):
    cfg = load_toml(TrainConfig(), path)
    assert cfg != TrainConfig()  # the file set something
    mc = cfg.model_config(cfg.vocab_size)  # GPTConfig checks n_embd % n_head, dropout range, ...
    assert mc.block_size == cfg.block_size and mc.n_layer == cfg.n_layer


def test_expected_configs_exist():
    assert {p.name for p in (EXAMPLES / "configs").glob("*.toml")} >= {"stdlib.toml", "shakespeare.toml", "tiny.toml"}


# ---- gpt2_sample.py ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from tinylm.tokenizer import BPETokenizer

    d = tmp_path_factory.mktemp("gpt2")
    text = "the quick brown fox jumps over the lazy dog. " * 40 + "caf\u00e9 na\u00efve \u2603 " * 20
    tok = BPETokenizer().train(text, 300, special_tokens=("<|endoftext|>",), progress=False)
    tok.to_gpt2_files(d)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=tok.vocab_size), seed=3).save_hf(d)
    return d


def test_gpt2_sample_prints_what_generate_gives(gpt2_dir, capsys):
    from tinylm.tokenizer import BPETokenizer

    rc = load_example("gpt2_sample").main([str(gpt2_dir), "--prompt", "the quick", "--max-new-tokens", "12",
                                            "--seed", "7", "--temperature", "1.0", "--top-k", "50"])
    assert rc == 0
    printed = capsys.readouterr().out
    # the same computation through the library
    model = GPT.from_hf(gpt2_dir)
    tok = BPETokenizer.from_gpt2_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt")
    ids = tok.encode("the quick")
    out = model.generate(ids, 12, temperature=1.0, top_k=50, seed=7, stop_tokens=(tok.eot_id,))
    new = [int(t) for t in out[len(ids):]]
    if tok.eot_id in new:
        new = new[: new.index(tok.eot_id)]
    assert printed == "the quick" + tok.decode(new) + "\n"
    assert len(new) > 0


def test_gpt2_sample_missing_files(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert load_example("gpt2_sample").main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "vocab.json" in err and "merges.txt" in err


# ---- training examples --------------------------------------------------------------------------
def test_shakespeare_missing_file_says_where_to_get_it(tmp_path, capsys):
    rc = load_example("shakespeare").main([str(tmp_path / "nope.txt")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope.txt" in err and "tinyshakespeare/input.txt" in err


def test_shakespeare_trains_and_samples(tmp_path, capsys):
    rng = np.random.default_rng(0)
    words = ["thou", "art", "my", "lord", "and", "good", "night", "sweet", "prince", "ROMEO:", "JULIET:"]
    lines = [" ".join(rng.choice(words, 8)) for _ in range(400)]
    text = tmp_path / "play.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    rc = load_example("shakespeare").main([str(text), "--config", str(TINY), f"out_dir={out}", "max_steps=4",
                                            "eval_interval=4", "sample_tokens=8", "sample_prompt=ROMEO:"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "--- sample ---\nROMEO:" in printed
    assert (out / "checkpoint" / "model.safetensors").is_file() and (out / "loss.png").is_file()


def test_stdlib_trains_and_samples(tmp_path, capsys):
    out = tmp_path / "out"
    rc = load_example("stdlib").main(["--config", str(TINY), f"out_dir={out}", "max_steps=3",
                                      "eval_interval=3", "sample_tokens=5"])
    assert rc == 0
    assert "--- sample ---\ndef " in capsys.readouterr().out
    assert (out / "log.jsonl").is_file()


def _write_log(d, vals, train=((10, 5.0), (20, 4.0))):
    d.mkdir()
    lines = [{"step": s, "loss": v, "lr": 1e-3} for s, v in train]
    lines += [{"step": s, "val_loss": v, "val_ppl": 1.0} for s, v in vals]
    (d / "log.jsonl").write_text("".join(__import__("json").dumps(x) + "\n" for x in lines))


def test_compare_runs_table_and_plot(tmp_path, capsys):
    _write_log(tmp_path / "a", [(10, 4.0), (20, 2.0)])
    _write_log(tmp_path / "b", [(10, 4.4), (20, 2.02), (30, 1.0)])  # step 30: only b has it
    png = tmp_path / "runs.png"
    rc = load_example("compare_runs").main([f"fp32={tmp_path / 'a'}", str(tmp_path / "b"), "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| run | val at 10 | val at 20 | vs fp32 |"
    assert out[2] == "| fp32 | 4.0000 | 2.0000 | - |"
    assert out[3] == "| b | 4.4000 | 2.0200 | +1.00% |"  # (2.02 - 2.0) / 2.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_runs_bad_input(tmp_path, capsys):
    mod = load_example("compare_runs")
    assert mod.main([str(tmp_path / "nothing")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "val_loss": "x"}\n')
    assert mod.main([str(tmp_path / "bad")]) == 2
    assert "log.jsonl:2: not a tinylm log line" in capsys.readouterr().err
