"""SFT through the shared Trainer: the mask is what trains, exact resume, the CLI, chat and compare."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tinylm.models import GPT, GPTConfig
from tinylm.posttrain.chat import ChatFormat
from tinylm.posttrain.compare import chat_loop, compare
from tinylm.posttrain.data import Problems, preference_record, read_jsonl
from tinylm.posttrain.stage import SFTConfig, load_policy, run
from tinylm.tokenizer import BPETokenizer
from tinylm.tokenizer.bpe import EOT
from tinylm.train.checkpoint import write_checkpoint_dir


def write_ckpt(path, chat_tokens=False, seed=0):
    tok = BPETokenizer()
    tok.add_special_tokens([EOT])
    if chat_tokens:
        ChatFormat(tok)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size), seed=seed)
    write_checkpoint_dir(path, m, None, {"step": 0, "model_type": "gpt", "model_config": m.config_dict()}, tok)
    return path


def random_user_data(path, n=200, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            u = "".join(rng.choice(list("abcdefghij"), int(rng.integers(8, 20))))
            f.write(json.dumps({"messages": [{"role": "user", "content": u},
                                             {"role": "assistant", "content": "OK"}]}) + "\n")
    return path


def cfg(tmp_path, **kw):
    base = dict(init=str(tmp_path / "init"), data=[str(tmp_path / "d.jsonl")], out_dir=str(tmp_path / "out"),
                max_steps=100, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_interval=50,
                log_interval=1, progress=False, task_eval=0, eval_init=False)
    base.update(kw)
    return SFTConfig(**base)


def log(tmp_path, name="out"):
    return [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sft_loss_goes_to_zero_when_only_the_constant_reply_is_trained(tmp_path):
    write_ckpt(tmp_path / "init")
    random_user_data(tmp_path / "d.jsonl")
    res = run("sft", cfg(tmp_path))
    losses = [r["loss"] for r in log(tmp_path) if "loss" in r]
    # trained targets are "O", "K", <|end|> after <|assistant|>: fully predictable
    assert np.mean(losses[-5:]) < 0.05, losses[-5:]
    assert res["skipped_batches"] == 0
    # the same conversations with the user turns trained too: random letters keep the loss high
    from tinylm.posttrain import chat as chat_mod
    orig = chat_mod.ChatFormat.render
    chat_mod.ChatFormat.render = lambda self, m, train_roles=("assistant",): orig(self, m, ("user", "assistant"))
    try:
        run("sft", cfg(tmp_path, out_dir=str(tmp_path / "all"), max_steps=30))
    finally:
        chat_mod.ChatFormat.render = orig
    all_losses = [r["loss"] for r in log(tmp_path, "all") if "loss" in r]
    assert np.mean(all_losses[-5:]) > 1.0, all_losses[-5:]


def test_sft_resume_is_exact_and_lora_checkpoints_hold_adapters_only(tmp_path):
    write_ckpt(tmp_path / "init")
    random_user_data(tmp_path / "d.jsonl", n=40)
    run("sft", cfg(tmp_path, out_dir=str(tmp_path / "a"), max_steps=6, eval_interval=3, lora_rank=2))
    run("sft", cfg(tmp_path, out_dir=str(tmp_path / "b"), max_steps=6, eval_interval=3, lora_rank=2), max_steps=3)
    run("sft", cfg(tmp_path, out_dir=str(tmp_path / "b"), max_steps=6, eval_interval=3, lora_rank=2), resume=True)
    la = [r["loss"] for r in log(tmp_path, "a") if "loss" in r]
    lb = [r["loss"] for r in log(tmp_path, "b") if "loss" in r]
    assert len(la) == 6 and la == lb
    from safetensors.numpy import load_file
    saved = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    rows = sorted(k for k in saved if k.startswith("added_rows."))
    assert saved and all(k.endswith((".lora_A", ".lora_B")) for k in saved if k not in rows)
    # the chat tokens' rows (the init had none) are trained and kept with the adapters; the base
    # (OUT/init-merged: the init with the rows as initialised) keeps their starting values
    assert rows == ["added_rows.wte.weight"], rows
    base, _ = load_policy(tmp_path / "a" / "init-merged")
    old = base.config.vocab_size - saved[rows[0]].shape[0]
    assert np.abs(saved[rows[0]] - base.wte.weight.numpy()[old:]).max() > 1e-6
    # the adapter checkpoint loads merged into its base, with the trained rows
    model, tok = load_policy(tmp_path / "a" / "checkpoint")
    assert all("lora" not in n for n, _ in model.named_parameters())
    assert model.config.vocab_size == tok.vocab_size
    assert (model.wte.weight.numpy()[old:] == saved[rows[0]]).all()
    assert (model.wte.weight.numpy()[:old] == base.wte.weight.numpy()[:old]).all()


def test_chat_loop_and_compare_with_a_scripted_person(tmp_path):
    a = write_ckpt(tmp_path / "A", chat_tokens=True, seed=1)
    b = write_ckpt(tmp_path / "B", chat_tokens=True, seed=2)
    lines = iter(["hi", "/reset", "hello", "/quit"])
    out = []

    class Out:
        def write(self, s):
            out.append(s)

        def flush(self):
            pass

    assert chat_loop(a, max_new_tokens=5, seed=0, input_fn=lambda _: next(lines), out=Out()) == 0
    text = "".join(out)
    assert text.count("model> ") == 2 and "(conversation reset)" in text

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"question {i}" for i in range(6)) + "\n")
    prefs = tmp_path / "prefs.jsonl"

    def script(answers):
        it = iter(answers)

        def ask(_):
            try:
                x = next(it)
            except StopIteration:
                raise EOFError from None
            if x == "^C":
                raise KeyboardInterrupt
            return x
        return ask

    # 1, a typo (asked again), 2, tie, skip, then the input ends mid-session
    n = compare(a, b, prompts, prefs, max_new_tokens=4, seed=0, input_fn=script(["1", "x", "2", "t", "s"]), out=Out())
    assert n == 2
    # a second session skips the two judged prompts; Ctrl-C after one more pick loses nothing
    n2 = compare(a, b, prompts, prefs, max_new_tokens=4, seed=0, input_fn=script(["2", "^C"]), out=Out())
    assert n2 == 1
    probs = Problems()
    recs = read_jsonl([prefs], preference_record, probs)
    assert probs.count == 0 and len(recs) == 3
    asked = [r["prompt"][0]["content"] for r in recs]
    assert asked == ["question 0", "question 1", "question 2"]


def test_cli_sft_runs_and_reports_bad_lines(tmp_path):
    write_ckpt(tmp_path / "init")
    d = random_user_data(tmp_path / "d.jsonl", n=20)
    with open(d, "a") as f:
        f.write("{broken\n")
    r = subprocess.run([sys.executable, "-m", "tinylm", "sft", "--init", str(tmp_path / "init"), "--data", str(d),
                        "--out", str(tmp_path / "o"), "max_steps=2", "batch_size=2", "--no-progress",
                        "eval_interval=2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{d}:21: not JSON" in r.stdout
    assert (tmp_path / "o" / "checkpoint" / "state.json").is_file() and (tmp_path / "o" / "curves.png").is_file()
