"""Post-training on Llama (model=llama): LoRA on its (out, in) projections and untied head, SFT
with LoRA and DPO from a tiny Llama checkpoint, chained as the stages are."""
import json
import math

import numpy as np
import pytest

from tinylm import gradcheck
from tinylm.models import Llama, LlamaConfig
from tinylm.posttrain.lora import LoRALinear, apply_lora, disabled
from tinylm.posttrain.stage import DPOConfig, SFTConfig, load_policy, run
from tinylm.tokenizer import BPETokenizer
from tinylm.tokenizer.bpe import EOT
from tinylm.train.checkpoint import write_checkpoint_dir


def llama(dtype="float64", vocab=50, seed=1):
    return Llama(LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=16, block_size=32, vocab_size=vocab,
                             dtype=dtype), seed=seed)


IDX = np.random.default_rng(0).integers(0, 50, (2, 12))
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomize(lm, seed=2, std=0.3):
    rng = np.random.default_rng(seed)
    for _, p in lm.adapters():
        p.data[...] = rng.normal(0, std, p.shape)


def test_llama_zero_b_is_the_base_and_merge_unmerge_restores():
    base = llama()
    ref = base(IDX)[0].numpy()
    lm = apply_lora(base, rank=2, alpha=4, targets=",".join(PROJ), seed=0)
    assert len(lm.wrapped) == 2 * len(PROJ)
    assert sum(isinstance(m, LoRALinear) for m in lm.model.modules()) == 2 * len(PROJ)
    assert (lm(IDX)[0].numpy() == ref).all()  # B = 0: bit for bit the base Llama
    randomize(lm)
    w0 = {n: p.numpy().copy() for n, p in lm.named_parameters()}
    with_adapters = lm(IDX)[0].numpy()
    assert np.abs(with_adapters - ref).max() > 1e-3
    with disabled(lm):
        assert (lm(IDX)[0].numpy() == ref).all()
    lm.merge()
    np.testing.assert_allclose(lm(IDX)[0].numpy(), with_adapters, rtol=0, atol=1e-12)
    lm.unmerge()
    for n, p in lm.named_parameters():
        assert (np.abs(p.numpy() - w0[n]) <= np.spacing(np.abs(w0[n]) + 1.0)).all(), n
    np.testing.assert_allclose(lm(IDX)[0].numpy(), with_adapters, rtol=0, atol=1e-12)


def test_llama_lora_gradients_gradcheck_and_frozen_weights_get_none():
    lm = apply_lora(llama(), rank=2, alpha=4, targets="all", seed=0)
    # every projection; not the untied head (the model reads its weight, an adapter would not train)
    assert len(lm.wrapped) == 2 * len(PROJ) and "lm_head" not in lm.wrapped
    with pytest.raises(ValueError, match="LM head"):
        apply_lora(llama(), rank=2, alpha=4, targets="q_proj,lm_head")
    randomize(lm, std=0.2)
    adapters = [p for _, p in lm.adapters()]
    _, loss = lm(IDX, IDX)
    loss.backward()
    assert all(p.grad is None for n, p in lm.named_parameters() if "lora_" not in n)
    assert all(p.grad is not None and np.abs(p.grad).sum() > 0 for p in adapters)
    for p in adapters:
        p.grad = None
    # finite differences through the whole Llama, w.r.t. adapters of attention (GQA k/v), the MLP and
    # both layers (the inputs are the adapter parameters themselves, which the model reads);
    # random directions: 2 forwards per input and direction
    some = [p for n, p in lm.adapters() if any(k in n for k in ("0.self_attn.k_proj", "0.self_attn.v_proj",
                                                                  "0.mlp.down_proj", "1.self_attn.o_proj",
                                                                  "1.mlp.gate_proj"))]
    assert len(some) == 10
    assert gradcheck(lambda *_: lm(IDX, IDX)[1], some, n_directions=2, full_jacobian_limit=0)

# ---- the stages on a Llama checkpoint ---------------------------------------------------------------
def write_llama_ckpt(path):
    tok = BPETokenizer()
    tok.add_special_tokens([EOT])  # no chat tokens: the stage adds them, growing embed_tokens and lm_head
    m = Llama(LlamaConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=32, block_size=64, vocab_size=tok.vocab_size),
              seed=0)
    write_checkpoint_dir(path, m, None, {"step": 0, "model_type": "llama", "model_config": m.config_dict()}, tok)
    return path


def log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sft_with_lora_then_dpo_on_a_llama_checkpoint(tmp_path):
    write_llama_ckpt(tmp_path / "init")
    with open(tmp_path / "chat.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"},
                                             {"role": "assistant", "content": "OK"}]}) + "\n")
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"q {i}", "chosen": "OK", "rejected": f"no {i}"}) + "\n")
    common = dict(batch_size=4, eval_interval=4, log_interval=1, progress=False, task_eval=0, eval_init=False,
                  warmup_steps=1, lora_rank=4, lora_targets="all")
    sft = run("sft", SFTConfig(init=str(tmp_path / "init"), data=[str(tmp_path / "chat.jsonl")],
                               out_dir=str(tmp_path / "sft"), max_steps=8, lr=1e-2, min_lr=1e-3, val_every=6, **common))
    losses = [r["loss"] for r in log(tmp_path / "sft") if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert sft["skipped_batches"] == 0
    # the adapter-only checkpoint loads merged into its base: a plain Llama with the chat tokens
    merged, tok = load_policy(tmp_path / "sft" / "checkpoint")
    assert isinstance(merged, Llama) and merged.config.vocab_size == tok.vocab_size
    assert all("lora" not in n for n, _ in merged.named_parameters())
    # ... and it is the trained policy: the same logits as the run's LoRA model
    x = np.array([tok.encode("hello 3")], dtype=np.int64)
    np.testing.assert_allclose(merged(x)[0].numpy(), sft["model"](x)[0].numpy(), rtol=0, atol=1e-5)

    # DPO from the SFT checkpoint, again with LoRA (the reference: the same model, adapters off)
    run("dpo", DPOConfig(init=str(tmp_path / "sft" / "checkpoint"), data=[str(tmp_path / "pairs.jsonl")],
                         out_dir=str(tmp_path / "dpo"), max_steps=4, lr=1e-3, min_lr=1e-4, val_every=8, **common))
    steps = [r for r in log(tmp_path / "dpo") if "loss" in r]
    assert len(steps) == 4
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-5  # policy = reference at step 0
    assert steps[0]["reward_margin"] == 0.0 and steps[-1]["reward_margin"] != 0.0
    policy, _ = load_policy(tmp_path / "dpo" / "checkpoint")
    assert isinstance(policy, Llama)
