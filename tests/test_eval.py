"""tinylm.eval: perplexity windows, multiple choice, exact match, the `tinylm eval` command.

Small models only: a random 1-layer GPT for the perplexity identities, a 1-layer GPT trained in
a few seconds to overfit four facts for multiple choice, and stub models with known logits
where the test needs exact log-likelihoods (uniform: every token -log V)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm.eval import mc, ppl
from tinylm.eval.common import bootstrap_stderr, complete, sequence_logprobs
from tinylm.eval.exact import exact_match
from tinylm.models import GPT, GPTConfig
from tinylm.tensor import Tensor
from tinylm.tokenizer import BPETokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread: with the cores shared (load 12 on 2 cores) the
    overfit test took 37 s on two threads and 8 s on one."""
    from kernels import _threads

    before = _threads.get_num_threads()
    _threads.set_num_threads(1)
    yield
    _threads.set_num_threads(before)


def byte_tok():
    """A tokenizer with no merges: one token per byte, end-of-text = 256."""
    return BPETokenizer().train("abc", 257, special_tokens=("<|endoftext|>",), progress=False)


def random_gpt(block=16, vocab=257, seed=0, dtype="float32"):
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=block, vocab_size=vocab, dtype=dtype), seed=seed).eval()


def log_softmax64(z):
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


class StubModel:
    """A language model with logits chosen by a rule: ``rule(idx, V) -> logits (B, T, V)``. Offers
    what the scorers and tinylm.generate use: config, the forward, new_cache, eval/train."""

    def __init__(self, rule, vocab=257, block=64):
        self.rule, self.training = rule, False
        self.config = SimpleNamespace(block_size=block, vocab_size=vocab)

    def __call__(self, idx, targets=None, cache=None, start=None, ignore_index=-100):
        idx = np.asarray(idx)
        if cache is not None:
            cache.pos = (cache.pos if start is None else start) + idx.shape[1]
        return Tensor(self.rule(idx, self.config.vocab_size).astype(np.float32)), None

    def _dev(self, a):
        return a

    def new_cache(self, batch):
        return SimpleNamespace(pos=0)

    def eval(self):
        return self

    def train(self, mode=True):
        self.training = mode
        return self


def uniform(idx, V):
    return np.zeros(idx.shape + (V,))


def next_byte(idx, V):  # the next token is always the last byte + 1
    out = np.full(idx.shape + (V,), -30.0)
    nxt = (idx + 1) % 256
    np.put_along_axis(out, nxt[..., None], 30.0, axis=-1)
    return out


# ---- windows ---------------------------------------------------------------------------------

@given(st.integers(2, 300), st.integers(1, 40), st.data())
def test_windows_score_every_target_once_within_the_context(n, window, data):
    stride = data.draw(st.integers(1, window))
    plan = ppl.plan_windows(n, window, stride)
    scored = []
    for b, e, first in plan:
        assert 0 < e - b <= window and b + 1 <= first <= e
        scored.extend(range(first, e + 1))
    assert scored == list(range(1, n))  # each target 1..n-1 once, in order
    if stride == window:  # sliding with stride = window is the non-overlapping plan
        assert all(first == b + 1 for b, e, first in plan)
        assert [b for b, _, _ in plan] == list(range(0, n - 1, window))


def test_window_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match="longer than the model's context"):
        ppl.score_stream(random_gpt(block=16), np.arange(40) % 257, 17, 17)


# ---- perplexity against an independent NumPy computation -------------------------------------

def _numpy_ppl(model, tokens, keep, window, stride):
    """HF's recipe written out again: windows start every `stride` tokens; each scores the
    targets after the previous window's end; log-softmax in float64 from the model's logits."""
    n, total, count, prev_end, begin = len(tokens), 0.0, 0, 0, 0
    while prev_end < n - 1:
        end = min(begin + window, n - 1)
        if end > prev_end:
            logits = model(tokens[None, begin:end])[0].data[0]
            lp = log_softmax64(logits)
            for j in range(end - begin):
                t = begin + 1 + j
                if t > prev_end and keep[t]:
                    total -= lp[j, tokens[t]]
                    count += 1
            prev_end = end
        begin += stride
    return total / count


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5), (7, 3)])
def test_perplexity_is_exp_of_the_mean_token_loss(window, stride):
    model = random_gpt(block=16)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 257, 101)
    keep = rng.random(101) > 0.1  # some targets are separators, not scored
    res = ppl.perplexity(model, tokens, keep, n_bytes=500, window=window, stride=stride, batch_size=3)
    want = _numpy_ppl(model, tokens, keep, window, stride)
    got = res["sliding"]
    # float32 logits; the loss kernel sums a window's rows in float32: 1e-6 relative is the arithmetic
    assert got["nats_per_token"] == pytest.approx(want, rel=2e-6)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=2e-6)
    assert got["tokens_scored"] == int(keep[1:].sum())
    assert got["bits_per_byte"] == pytest.approx(want * got["tokens_scored"] / math.log(2) / 500, rel=2e-6)
    assert res["non_overlapping"]["nats_per_token"] == pytest.approx(_numpy_ppl(model, tokens, keep, window, window),
                                                                      rel=2e-6)


def test_sliding_with_stride_equal_to_the_window_is_the_non_overlapping_result():
    model = random_gpt(block=16)
    tokens = np.random.default_rng(2).integers(0, 257, 150)
    res = ppl.perplexity(model, tokens, window=16, stride=16)
    assert res["sliding"]["nll_sum"] == res["non_overlapping"]["nll_sum"]  # the same windows: equal floats
    # a smaller stride gives targets more context, so the result moves
    near = ppl.perplexity(model, tokens, window=16, stride=4)["sliding"]["nll_sum"]
    assert near != res["non_overlapping"]["nll_sum"]


def test_stream_of_texts_counts_utf8_bytes_and_scores_no_separator():
    tok = byte_tok()
    texts = ["héllo 🙂", "x", ""]
    tokens, keep, n_bytes = ppl.stream_of_texts(tok, texts)
    assert n_bytes == sum(len(t.encode("utf-8")) for t in texts)
    assert tokens[0] == tok.eot_id and not keep[0]
    assert int(keep.sum()) == n_bytes  # one token per byte with this tokenizer: every byte scored once
    assert all(t == tok.eot_id for t, k in zip(tokens, keep) if not k)


# ---- multiple choice -------------------------------------------------------------------------

def test_encode_pair_moves_trailing_space_to_the_continuation():
    tok = byte_tok()
    ctx, cont = mc.encode_pair(tok, "ab ", "c")
    assert tok.decode(ctx) == "ab" and tok.decode(cont) == " c"
    ctx, cont = mc.encode_pair(tok, "", "c")
    assert ctx == [tok.eot_id] and tok.decode(cont) == "c"


def test_acc_norm_differs_from_acc_where_lengths_differ():
    # uniform logits: every token costs log V, one byte = one token. "a" (1 token) beats
    # "abcdefgh" (8 tokens) on the sum, ties per token, and loses per character only if the
    # longer choice were cheaper per character: make it so with 2 of its chars per token
    tok = BPETokenizer().train(["ab cd ef gh"] * 50, 261, special_tokens=("<|endoftext|>",), progress=False)
    assert len(tok.encode("abcdefgh")) < 8
    model = StubModel(uniform, vocab=tok.vocab_size)
    ex = [{"context": "q:", "choices": ["z", "abcdefgh"], "label": 1}]
    res = mc.mc_eval(model, tok, ex)
    row = res["examples"][0]
    V = tok.vocab_size
    for c in row["choices"]:
        assert c["loglikelihood"] == pytest.approx(-c["tokens"] * math.log(V), rel=1e-6)
    assert row["pred"]["acc"] == 0 and row["pred"]["acc_norm"] == 1 and row["pred"]["acc_bytes"] == 1
    assert res["metrics"]["acc"]["value"] == 0.0 and res["metrics"]["acc_norm"]["value"] == 1.0


def _overfit_facts():
    facts = ["Ared\n", "Bblue\n", "Cgreen\n", "Dwhite\n"]  # a key, then its colour
    from tinylm.optim import AdamW, ParamStore

    tok = byte_tok()
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=257), seed=0)
    store = ParamStore.for_model(model, 0.0)
    opt = AdamW(store, lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(120):  # batches of 4 sequences, each the four facts in a random order
        ids = np.stack([[tok.eot_id] + tok.encode("".join(facts[i] for i in rng.permutation(4)))[:32]
                        for _ in range(4)])
        store.zero_grad()
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
    return model.eval(), tok


@pytest.mark.slow  # ~17 s on a quiet machine (120 training steps), over 100 s on a loaded one
def test_mc_picks_the_answer_a_model_trained_on_the_facts_knows():
    model, tok = _overfit_facts()
    colours = ["red\n", "blue\n", "green\n", "white\n"]
    other = ["Dwhite\n", "Cgreen\n", "Ared\n", "Bblue\n"]  # a fact before the key, as in training
    ex = [{"context": f"{other[i]}{key}", "choices": colours, "label": i} for i, key in enumerate("ABCD")]
    res = mc.mc_eval(model, tok, ex, batch_size=3)
    assert res["metrics"]["acc"]["value"] == 1.0, [r["pred"] for r in res["examples"]]
    # the log-likelihoods are those of the model's own forward, token by token
    ctx, cont = mc.encode_pair(tok, "Cgreen\nB", "blue\n")
    logits = model(np.array([ctx + cont[:-1]]))[0].data[0]
    lp = log_softmax64(logits)[len(ctx) - 1:]
    want = sum(lp[j, t] for j, t in enumerate(cont))
    assert res["examples"][1]["choices"][1]["loglikelihood"] == pytest.approx(want, abs=1e-6)


def test_fewshot_prefix_and_builtin_task():
    ex, path = mc.load_task("nextline")
    assert len(ex) >= 100 and all(len(e["choices"]) == 4 for e in ex)
    assert len({e["label"] for e in ex}) == 4  # the answer's position is shuffled
    pre = mc._prefixes(ex[:5], 2, seed=3)
    assert pre == mc._prefixes(ex[:5], 2, seed=3) and all(p.count("\n\n") >= 2 for p in pre)
    assert ex[0]["context"] not in pre[0]


def test_make_nextline_is_deterministic():
    src = "\n".join(f"def f{i}(x):\n    y = x + {i} * 2\n    z = y * y - {i}\n    return z + 1000\n" for i in range(30))
    other = "\n".join(f"def g{i}(a):\n    b = str(a) + 'suffix'\n    c = len(b) * {i}\n    return c or None\n"
                      for i in range(30))
    a = mc.make_nextline([src, other], n=20, seed=1)
    assert a == mc.make_nextline([src, other], n=20, seed=1) and len(a) == 20
    for e in a:
        right = e["choices"][e["label"]]
        indent = right[:len(right) - len(right.lstrip())]
        assert all(c.startswith(indent) and c.endswith("\n") for c in e["choices"])


def test_sequence_logprobs_batched_equals_one_at_a_time():
    model = random_gpt(block=16)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 257, n).tolist() for n in (17, 5, 9, 2, 17)]
    froms = [3, 1, 8, 1, 16]
    batched = sequence_logprobs(model, seqs, froms, batch_size=4)
    for s, f, b in zip(seqs, froms, batched):
        one = sequence_logprobs(model, [s], [f])[0]
        np.testing.assert_allclose(b, one, rtol=0, atol=1e-5)  # batch shape changes BLAS sums only


def test_bootstrap_stderr_matches_the_binomial():
    v = np.r_[np.ones(300), np.zeros(700)]
    assert bootstrap_stderr(v, 2000) == pytest.approx(math.sqrt(0.3 * 0.7 / 1000), rel=0.1)


# ---- exact match and completions ---------------------------------------------------------------

def test_complete_stops_at_stop_strings_and_exact_match_scores():
    tok = byte_tok()
    model = StubModel(next_byte)
    assert complete(model, tok, "a", 1, 5) == ["bcdef"]
    assert complete(model, tok, "a", 2, 10, stop=("e",)) == ["bcd", "bcd"]
    ex = [{"prompt": "a", "answer": " bcd "}, {"prompt": "x", "answer": "abc"}]
    res = exact_match(model, tok, ex, max_new_tokens=3)
    assert res["exact_match"] == 0.5 and [r["correct"] for r in res["examples"]] == [True, False]
    assert res["examples"][1]["completion"] == "yz{"


# ---- the command -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tinylm.train import TrainConfig, train

    d = tmp_path_factory.mktemp("evalrun")
    text = d / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "x", "(", ")", ":", "\n", "    ", "import", "os", "=", "1"]
    text.write_text("".join(rng.choice(words) + " " for _ in range(6000)))
    cfg = TrainConfig(data=[str(text)], out_dir=str(d / "run"), vocab_size=300, n_layer=1, n_head=2, n_embd=16,
                      block_size=32, batch_size=4, max_steps=20, eval_interval=20, eval_batches=1, log_interval=10,
                      warmup_steps=2, sample_tokens=0, progress=False)
    train(cfg)
    return d / "run" / "checkpoint", text


def _cli(*argv):
    from tinylm.cli import main

    return main(["eval", *map(str, argv)])


def test_cli_ppl_writes_result_and_windows(ckpt, tmp_path, capsys):
    ck, text = ckpt
    out, per = tmp_path / "r.json", tmp_path / "w.jsonl"
    assert _cli("--ckpt", ck, "--task", "ppl", "--data", text, "--window", 32, "--stride", 8, "--max-tokens", 500,
                "--out", out, "--per-example", per) == 0
    rec = json.loads(out.read_text())
    assert rec["checkpoint"]["model_sha256"] and rec["data"]["tokens_sha256"] and rec["data"]["bytes"] > 0
    r = rec["results"]
    assert r["sliding"]["stride"] == 8 and r["non_overlapping"]["stride"] == 32 and r["sliding"]["window"] == 32
    rows = [json.loads(x) for x in per.read_text().splitlines()]
    nll = sum(x["nll"] for x in rows if x["plan"] == "sliding")
    assert nll == pytest.approx(r["sliding"]["nll_sum"], rel=1e-9)  # the windows add up to the result
    assert "perplexity" in capsys.readouterr().out


def test_cli_mc_and_exact(ckpt, tmp_path):
    ck, _ = ckpt
    out, per = tmp_path / "mc.json", tmp_path / "mc.jsonl"
    ex, _ = mc.load_task("nextline")  # the built-in task's contexts, with short choices for a 32-token model
    task = tmp_path / "mc_task.jsonl"
    task.write_text("".join(json.dumps({"context": e["context"][-40:], "choices": ["x\n", "return\n", "def\n", "os\n"],
                                        "label": i % 4}) + "\n" for i, e in enumerate(ex[:10])))
    assert _cli("--ckpt", ck, "--task", "mc", "--data", task, "--limit", 8, "--num-fewshot", 1, "--out", out,
                "--per-example", per) == 0
    rec = json.loads(out.read_text())
    assert rec["data"]["examples"] == 8 and set(rec["results"]["metrics"]) == set(mc.METRICS)
    rows = [json.loads(x) for x in per.read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["choices"]) == 4 for r in rows)
    task = tmp_path / "exact.jsonl"
    task.write_text('{"prompt": "def", "answer": "x"}\n{"prompt": "import", "answer": "os"}\n')
    assert _cli("--ckpt", ck, "--task", "exact", "--data", task, "--max-new-tokens", 4, "--out", out) == 0
    assert json.loads(out.read_text())["results"]["n"] == 2


def test_cli_errors_are_one_line(ckpt, capsys):
    ck, _ = ckpt
    assert _cli("--task", "ppl") == 2
    assert _cli("--ckpt", ck, "--task", "ppl", "--window", 64) == 2
    assert "longer than the model's context" in capsys.readouterr().err


# ---- context study pieces ----------------------------------------------------------------------

def test_attention_variants_agree_and_loss_by_position_is_the_windows_mean():
    from tinylm.eval import context_study as cs

    model = random_gpt(block=16)
    tokens = np.random.default_rng(4).integers(0, 257, 65)
    keep = np.ones(65, dtype=bool)
    base = cs.loss_by_position(model, tokens, keep, 16)
    want = np.mean([-log_softmax64(model(tokens[None, w * 16:(w + 1) * 16])[0].data[0])[np.arange(16),
                                                                                       tokens[w * 16 + 1:(w + 1) * 16 + 1]]
                    for w in range(4)], axis=0)
    np.testing.assert_allclose(base, want, rtol=1e-6)
    import kernels

    before = {op: kernels.get(op, backend="cpu") for op in ("attention_fwd", "attention_bwd")}
    try:
        for name in ("cpu_flash", "cpu_plain"):
            cs.use_attention(name)
            np.testing.assert_allclose(cs.loss_by_position(model, tokens, keep, 16), base, rtol=1e-4)
    finally:
        for op, fn in before.items():
            kernels.register(op, "cpu")(fn)
    table = cs.table([{"context": 16, "batch": 2, "val_ppl": 1.0, "val_bpb": 0.5, "val_ppl_sliding": 1.0,
                       "train_tokens_per_s": 10.0, "k": {"train_tokens_per_s": 1.0, "train_peak_mib": 2.0,
                                                         "infer_peak_mib": 3.0, "attention_peak_mib": 4.0}}], ("k",))
    assert table.count("\n") == 2 and "k train peak MiB" in table


def test_list_options_take_spaces_or_commas():
    """``--k 1 5``, ``--k 1,5`` and ``--k=1,5`` are the same; a bad item names itself."""
    import argparse

    from tinylm.eval import cli

    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers())
    for argv in (["--k", "1", "5"], ["--k=1,5"], ["--k", "1,", "5"]):
        assert p.parse_args(["eval", "--task", "humaneval", *argv]).k == [1, 5]
    a = p.parse_args(["eval", "--task", "syntax", "--temperatures=0.2,0.8", "--contexts", "256,512", "1024"])
    assert a.temperatures == [0.2, 0.8] and a.contexts == [256, 512, 1024]
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "--task", "humaneval", "--k=1,x"])
