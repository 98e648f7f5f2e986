"""tinylm against the reference implementations, when installed (skipped otherwise):
HF ``tokenizers`` (trainer and encoder) and ``tiktoken`` (encoder), on Python standard-library
source gathered from the running interpreter (no shared data files)."""
import json
import os
import sysconfig

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm.tokenizer import GPT2_PATTERN, BPETokenizer
from tinylm.tokenizer.gpt2 import token_to_str


def stdlib_corpus(max_bytes):
    """Python files of the stdlib dir, sorted by path, concatenated up to max_bytes."""
    root = sysconfig.get_paths()["stdlib"]
    out, n = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib"))
        for f in sorted(filenames):
            if f.endswith(".py"):
                try:
                    s = open(os.path.join(dirpath, f), encoding="utf-8").read()
                except (UnicodeDecodeError, OSError):
                    continue
                out.append(s)
                n += len(s)
                if n >= max_bytes:
                    return out
    return out


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus(400_000)


def hf_train(texts, vocab_size, specials=()):
    tk = pytest.importorskip("tokenizers")
    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=list(specials),
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    merges = json.loads(hf.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


@pytest.mark.parametrize("vocab_size", [300, 1000, 3000])
def test_trainer_gives_hf_merges(corpus, vocab_size):
    ours = BPETokenizer().train(corpus, vocab_size, special_tokens=(), progress=False)
    got = [(token_to_str(ours.token_bytes(a)), token_to_str(ours.token_bytes(b))) for a, b in ours.merges]
    assert got == hf_train(corpus, vocab_size)


def test_hf_encoder_gives_our_ids(corpus, tmp_path):
    tk = pytest.importorskip("tokenizers")
    ours = BPETokenizer().train(corpus, 2000, progress=False)
    vpath, mpath = ours.to_gpt2_files(tmp_path)
    hf = tk.Tokenizer(tk.models.BPE.from_file(vpath, mpath))
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = tk.decoders.ByteLevel()
    text = "".join(corpus[:40]) + " 日本語 😀 naïve café 1234567 x'S we'll"
    assert ours.encode(text, allowed_special="none") == hf.encode(text).ids


def test_tiktoken_gives_our_ids(corpus):
    tiktoken = pytest.importorskip("tiktoken")
    ours = BPETokenizer().train(corpus, 2000, progress=False)
    ranks = {ours.token_bytes(i): i for i in range(ours.vocab_size) if i not in ours.special_tokens.values()}
    enc = tiktoken.Encoding("tinylm-test", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens=dict(ours.special_tokens))
    text = "".join(corpus) + "<|endoftext|> 日本語 😀\x00\r\n  \t"
    assert ours.encode(text) == enc.encode(text, allowed_special="all")
    assert ours.encode(text, allowed_special="none") == enc.encode(text, disallowed_special=())


def test_load_hf_saved_files_with_specials_first(corpus, tmp_path):
    """HF's own vocab.json/merges.txt put the special token at id 0 and the bytes at 1..256:
    a layout tinylm never writes. Loaded, tinylm must give HF's ids."""
    tk = pytest.importorskip("tokenizers")
    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = tk.trainers.BpeTrainer(vocab_size=1500, show_progress=False, special_tokens=["<|endoftext|>"],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(corpus, trainer)
    vpath, mpath = hf.model.save(str(tmp_path))
    ours = BPETokenizer.from_gpt2_files(vpath, mpath)
    assert ours.special_tokens == {"<|endoftext|>": 0} and ours.vocab_size == hf.get_vocab_size()
    text = "".join(corpus[:30]) + "<|endoftext|>" + " 日本語 😀 café\r\n"
    assert ours.encode(text) == hf.encode(text).ids  # HF's encoder knows the special (trainer added it)
    assert ours.decode(ours.encode(text)) == text


@pytest.fixture(scope="module")
def tiktoken_pair(corpus):
    tiktoken = pytest.importorskip("tiktoken")
    ours = BPETokenizer().train(corpus[:20], 1200, special_tokens=(), progress=False)
    ranks = {ours.token_bytes(i): i for i in range(ours.vocab_size)}
    return ours, tiktoken.Encoding("tinylm-fuzz", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})


@given(st.one_of(st.text(), st.text(alphabet=" \n\t'sdefilmnortv0123456789()_.é日😀", max_size=200)))
def test_encode_equals_tiktoken_on_any_text(tiktoken_pair, s):
    ours, enc = tiktoken_pair
    assert ours.encode(s) == enc.encode_ordinary(s)


@given(st.lists(st.text(alphabet="ab c\n'é", max_size=40), min_size=1, max_size=8), st.integers(257, 320))
def test_trainer_equals_hf_on_small_corpora(texts, vocab_size):
    ours = BPETokenizer().train(texts, vocab_size, special_tokens=(), progress=False)
    got = [(token_to_str(ours.token_bytes(a)), token_to_str(ours.token_bytes(b))) for a, b in ours.merges]
    assert got == hf_train(texts, vocab_size)
