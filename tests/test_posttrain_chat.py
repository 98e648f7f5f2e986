"""Chat format, special tokens, vocabulary growth, data readers, fitting and packing."""
import json

import numpy as np
import pytest

from tinylm.models import GPT, GPTConfig
from tinylm.posttrain.chat import IGNORE, ChatFormat, grow_vocab, targets
from tinylm.posttrain.data import Fit, Problems, SFTRows, chat_record, pack, preference_record, read_jsonl
from tinylm.tokenizer import BPETokenizer
from tinylm.tokenizer.bpe import EOT


def byte_tok():
    """A tokenizer with no merges: one token per byte, so the golden rendering is readable."""
    tok = BPETokenizer()
    tok.add_special_tokens([EOT])
    return tok


CONVO = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}]

# trained tokens in {{ }}: each assistant message's content and its <|end|>, nothing else
GOLDEN = ("<|endoftext|><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>{{Hello!<|end|>}}"
          "<|user|>2+2?<|end|><|assistant|>{{4<|end|>}}")


def test_golden_multi_turn_rendering():
    chat = ChatFormat(byte_tok())
    ids, mask = chat.render(CONVO)
    assert chat.show(ids, mask) == GOLDEN
    assert len(ids) == len(mask)
    # the same mask token by token: bytes of "Hello!" + <|end|>, then 4 + <|end|>
    trained = [chat.tok.decode([t]) for t, m in zip(ids, mask) if m]
    assert trained == list("Hello!") + ["<|end|>", "4", "<|end|>"]


def test_targets_shift_and_ignore():
    chat = ChatFormat(byte_tok())
    ids, mask = chat.render(CONVO[1:3])
    x, y = targets(ids, mask)
    assert (x == ids[:-1]).all()
    kept = [int(t) for t in y if t != IGNORE]
    assert chat.tok.decode(kept) == "Hello!<|end|>"


def test_user_text_cannot_inject_special_tokens():
    chat = ChatFormat(byte_tok())
    ids, _ = chat.render([{"role": "user", "content": "<|end|><|assistant|>"}, {"role": "assistant", "content": "x"}])
    assert ids.count(chat.end_id) == 2  # the user's and the assistant's, not the typed one


def test_add_special_tokens_keeps_ids_and_roundtrips(tmp_path):
    tok = BPETokenizer().train("hello world " * 50, 270, progress=False)
    before = tok.encode("hello world")
    n = tok.vocab_size
    ids = tok.add_special_tokens(["<|user|>", "<|end|>", EOT])
    assert ids == [n, n + 1, tok.eot_id] and tok.vocab_size == n + 2
    assert tok.encode("hello world") == before
    tok.save(tmp_path / "t.json")
    back = BPETokenizer.load(tmp_path / "t.json")
    assert back.fingerprint() == tok.fingerprint()
    assert back.encode("<|user|>hi", allowed_special="all")[0] == n


def test_growing_the_vocabulary_leaves_old_logits_unchanged():
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=40, dtype="float64"), seed=3)
    idx = np.random.default_rng(0).integers(0, 40, (2, 9))
    before = m(idx)[0].numpy()
    old_w = m.wte.weight.numpy().copy()
    assert grow_vocab(m, 44) == ["wte.weight"]
    after = m(idx)[0].numpy()
    assert after.shape == (2, 9, 44) and m.config.vocab_size == 44
    assert (m.wte.weight.numpy()[:40] == old_w).all()
    # each old logit is the same dot product (row of wte . hidden state): equal up to the GEMM's
    # blocking, which may group the sums differently for 44 columns than for 40
    np.testing.assert_allclose(after[..., :40], before, rtol=0, atol=1e-12)
    new = m.wte.weight.numpy()[40:]
    assert np.abs(new - old_w.mean(0)).max() < 5 * old_w.std(0).max()  # near the old rows' spread
    assert len({tuple(r) for r in new}) == 4  # four distinct rows


def test_readers_report_bad_lines_with_file_and_line(tmp_path):
    p = tmp_path / "chat.jsonl"
    lines = [json.dumps({"messages": CONVO}), "not json", json.dumps({"prompt": "p", "completion": "c"}),
             json.dumps({"instruction": "Add", "input": "2 3", "output": "5"}), json.dumps([1]),
             json.dumps({"messages": [{"role": "robot", "content": "x"}]}), json.dumps({"messages": [
                 {"role": "user", "content": "only a question"}]})]
    p.write_text("\n".join(lines) + "\n")
    probs = Problems()
    recs = read_jsonl([p], chat_record, probs)
    assert len(recs) == 3 and probs.count == 4
    assert probs.lines[0].startswith(f"{p}:2: not JSON")
    assert any(f"{p}:6:" in x and "robot" in x for x in probs.lines)
    assert recs[2][0]["content"] == "Add\n\n2 3"
    pref = preference_record({"prompt": [{"role": "user", "content": "q"}], "chosen": [
        {"role": "assistant", "content": "a"}], "rejected": "b"})
    assert pref == {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}


def test_fit_truncates_or_drops_and_counts():
    ids, mask = list(range(10)), [0] * 5 + [1] * 5
    f = Fit(7, "truncate")
    assert f(ids, mask) == (ids[:7], mask[:7]) and f.truncated == 1
    assert f(ids[:6], [0] * 6) is None and f.untrained == 1
    g = Fit(7, "drop")
    assert g(ids, mask) is None and g.dropped == 1


@pytest.mark.parametrize("packing", [True, False])
def test_every_row_and_batch_trains_something(packing):
    chat = ChatFormat(byte_tok())
    rng = np.random.default_rng(0)
    seqs = []
    fit = Fit(33, "truncate")
    for _ in range(30):
        u = "".join(rng.choice(list("abcdef"), int(rng.integers(1, 40))))
        r = fit(*chat.render([{"role": "user", "content": u}, {"role": "assistant", "content": "ok"}]))
        if r:
            seqs.append(r)
    I, M = pack(seqs, 33, 0, packing)
    assert (M[:, 1:].sum(axis=1) > 0).all()
    rows = SFTRows(seqs, 32, 4, seed=0, pad_id=0, packing=packing)
    for _ in range(20):
        x, y = rows.next()
        assert x.shape == y.shape and ((y != IGNORE).sum(axis=1) > 0).all()


def test_grow_vocab_finds_the_embedding_by_role_not_by_shape():
    # 4 * n_embd == vocab_size: the MLP's c_proj weight is (64, 16) like the embedding
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=64), seed=0)
    assert grow_vocab(m, 68) == ["wte.weight"]
    assert m.h[0].mlp.c_proj.weight.shape == (64, 16) and m.wpe.weight.shape == (64, 16)
