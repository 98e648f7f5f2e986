"""Exact resume of DPO and GRPO: a run stopped and resumed equals the straight run, in every
logged metric and in the weights it ends with (with and without LoRA)."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from tinylm.models import GPT, GPTConfig
from tinylm.posttrain.chat import ChatFormat
from tinylm.posttrain.stage import DPOConfig, GRPOConfig, run
from tinylm.tokenizer import BPETokenizer
from tinylm.tokenizer.bpe import EOT
from tinylm.train.checkpoint import write_checkpoint_dir

TIMING = ("tokens_per_s", "elapsed_s")


def write_ckpt(path, seed=0):
    tok = BPETokenizer()
    tok.add_special_tokens([EOT])
    ChatFormat(tok)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size), seed=seed)
    write_checkpoint_dir(path, m, None, {"step": 0, "model_type": "gpt", "model_config": m.config_dict()}, tok)
    return path


def pairs_file(path, n=24, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = "".join(rng.choice(list("abcdef"), int(rng.integers(3, 9))))
            f.write(json.dumps({"prompt": q, "chosen": f"yes {i}", "rejected": "no" * int(rng.integers(1, 4))}) + "\n")
    return path


def prompts_file(path, n=12):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"say {i}", "answer": str(i % 3)}) + "\n")
    return path


def reward(rec, text):  # varies within a group: most groups carry a signal
    return float(len(text) % 3) + (1.0 if rec["answer"] in text else 0.0)


def log(out):
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def weights(out):
    return load_file(str(out / "checkpoint" / "model.safetensors"))


def straight_and_resumed(tmp_path, kind, make_cfg, steps=6, stop=3):
    run(kind, make_cfg(tmp_path / "a"))
    run(kind, make_cfg(tmp_path / "b"), max_steps=stop)
    run(kind, make_cfg(tmp_path / "b"), resume=True)
    la, lb = log(tmp_path / "a"), log(tmp_path / "b")
    assert [r["step"] for r in la if "loss" in r] == list(range(1, steps + 1))
    # every logged number of every step: loss, lr, grad norm, rewards; and each validation of the
    # straight run (the stopped run also validated where it stopped: an extra line)
    assert [r for r in la if "loss" in r] == [r for r in lb if "loss" in r]
    val_b = [r for r in lb if "val_loss" in r]
    assert all(r in val_b for r in la if "val_loss" in r)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), k
    return la, wa


def common(tmp_path, out, **kw):
    return dict(init=str(tmp_path / "init"), out_dir=str(out), max_steps=6, batch_size=4, lr=3e-3, min_lr=3e-4,
                warmup_steps=2, eval_interval=3, log_interval=1, progress=False, task_eval=0, eval_init=False, **kw)


# stopped at a checkpoint step (3) and between two (4, with micro-batches accumulated)
@pytest.mark.parametrize("lora_rank,grad_accum,stop", [(0, 2, 4), (2, 1, 3)])
def test_dpo_resume_is_exact(tmp_path, lora_rank, grad_accum, stop):
    write_ckpt(tmp_path / "init")
    pairs_file(tmp_path / "p.jsonl")
    la, wa = straight_and_resumed(tmp_path, "dpo", lambda out: DPOConfig(
        data=[str(tmp_path / "p.jsonl")], val_every=6,
        **common(tmp_path, out, lora_rank=lora_rank, grad_accum=grad_accum)), stop=stop)
    steps = [r for r in la if "loss" in r]
    assert all(k in steps[0] for k in ("reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"))
    assert steps[-1]["loss"] != steps[0]["loss"]  # it trained: a resume has something to get wrong
    assert any("val_loss" in r for r in la)
    if lora_rank:
        assert all(k.endswith((".lora_A", ".lora_B")) for k in wa)


# [amp #13] bf16: the policy's working copy is 16-bit storage (sampled through decoded weights),
# its activations 16-bit, the KL reference the init in bf16
@pytest.mark.parametrize("lora_rank,kl_coef,grad_accum,stop,dtype", [(0, 0.0, 2, 4, "fp32"), (2, 0.1, 1, 3, "fp32"),
                                                                     (0, 0.1, 1, 3, "bf16")])
def test_grpo_resume_is_exact(tmp_path, lora_rank, kl_coef, grad_accum, stop, dtype):
    write_ckpt(tmp_path / "init")
    prompts_file(tmp_path / "q.jsonl")
    reward_spec = f"{__file__}:reward"
    la, _ = straight_and_resumed(tmp_path, "grpo", lambda out: GRPOConfig(
        data=[str(tmp_path / "q.jsonl")], group_size=3, max_new_tokens=6, reward=reward_spec, kl_coef=kl_coef,
        dtype=dtype, **common(tmp_path, out, lora_rank=lora_rank, grad_accum=grad_accum)), stop=stop)
    steps = [r for r in la if "loss" in r]
    assert len({r["reward"] for r in steps}) > 1  # sampling differs step to step: its state must resume
    if kl_coef:
        assert all("kl" in r for r in steps)
        assert steps[0]["kl"] == 0.0  # policy = reference at the first step, in either format
