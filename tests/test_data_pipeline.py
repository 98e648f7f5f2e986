"""The pipeline end to end: exact and near dedup through ``prepare``, determinism across worker
counts, the split, shards and manifest, ``load_prepared``, atomic output and the CLI."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from test_data_support import ByteTokenizer, decode_prepared, make_tokenizer, random_doc, vocabulary
from tinylm.data import is_prepared_dir, load_prepared, prepare
from tinylm.data.shards import TokenStream
from tinylm.tokenizer import BPETokenizer

WORDS = vocabulary()


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def run(inputs, out, tok=None, **kw):
    kw.setdefault("progress", False)
    return prepare(inputs, out, ByteTokenizer() if tok is None else tok, **kw)


@pytest.mark.parametrize("tok", ["bytes", "bpe"])
def test_exact_dedup_removes_identical_and_whitespace_copies_keeps_distinct(tmp_path, tok):
    rng = random.Random(1)
    distinct = [random_doc(rng, WORDS, 30) for _ in range(20)]
    # near-identical but distinct: one word changed, punctuation changed, case changed
    distinct += [distinct[0].replace(distinct[0].split()[3], "zzzz", 1), distinct[1].rstrip(".") + "!",
                 distinct[2].upper()]
    copies = [distinct[3], distinct[4],                                   # byte-identical
              distinct[5].replace(" ", "  "), "\n " + distinct[6] + " \n\n",  # whitespace only
              distinct[7].replace(" ", "\n", 3), distinct[8].replace(" ", "\t")]
    write_jsonl(tmp_path / "a.jsonl", distinct[:12] + copies[:3])
    (tmp_path / "b.txt").write_text("<|endoftext|>".join(copies[3:] + distinct[12:]), encoding="utf-8")
    report = run([tmp_path / "a.jsonl", tmp_path / "b.txt"], tmp_path / "out", make_tokenizer(tok), dedup="exact")
    assert report["dedup"]["exact_duplicates"] == len(copies)
    kept = decode_prepared(tmp_path / "out")
    assert sorted(kept) == sorted(distinct)                      # every distinct doc, once
    ex = report["dedup"]["examples"][0]
    assert ex["kind"] == "exact" and ex["file"].endswith("a.jsonl") and ex["line"] == 13
    assert ex["duplicate_of"] == {"file": ex["file"], "line": 4}
    # with dedup off every copy stays
    report = run([tmp_path / "a.jsonl", tmp_path / "b.txt"], tmp_path / "off", dedup="off")
    assert report["kept"]["documents"] == len(distinct) + len(copies)


@pytest.mark.parametrize("tok", ["bytes", "bpe"])
def test_near_dedup_in_the_pipeline(tmp_path, tok):
    rng = random.Random(2)
    base = [random_doc(rng, WORDS, 200) for _ in range(30)]
    near = []
    for d in base[:10]:          # 2 of 200 words replaced: Jaccard ~0.9 on 5-word shingles
        w = d.split()
        w[50], w[150] = "qqq", "rrr"
        near.append(" ".join(w))
    far = []
    for d in base[10:15]:        # every 8th word replaced: Jaccard ~0.3, stays
        w = d.split()
        far.append(" ".join("sss" if i % 8 == 0 else x for i, x in enumerate(w)))
    # the last line is an exact copy of a near-duplicate: it must point at the kept original
    write_jsonl(tmp_path / "c.jsonl", base + near + far + [near[3]])
    report = run([tmp_path / "c.jsonl"], tmp_path / "out", make_tokenizer(tok), dedup="near", near_threshold=0.8)
    assert report["dedup"]["near_duplicates"] == 10 and report["dedup"]["exact_duplicates"] == 1
    assert sorted(decode_prepared(tmp_path / "out")) == sorted(base + far)
    ex = report["dedup"]["examples"]
    assert ex[0]["kind"] == "near" and ex[0]["line"] == 31 and ex[0]["duplicate_of"]["line"] == 1
    assert ex[-1]["kind"] == "exact" and ex[-1]["line"] == 46 and ex[-1]["duplicate_of"]["line"] == 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few files of generated text with planted copies (for dedup) and one long file."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(5)
    docs = [random_doc(rng, WORDS, rng.randint(20, 300)) for _ in range(300)]
    docs += docs[:20]
    write_jsonl(root / "a.jsonl", docs[:160])
    (root / "b.txt").write_text("<|endoftext|>".join(docs[160:]), encoding="utf-8")
    (root / "c.txt").write_text("\n\n".join(random_doc(rng, WORDS, 80) for _ in range(100)), encoding="utf-8")
    return root


def shard_bytes(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".npy" or p.name == "tokenizer.json"}


def test_same_inputs_and_seed_give_identical_shards_for_any_worker_count(corpus, tmp_path):
    kw = dict(tokenizer=None, vocab_size=300, dedup="near", shard_tokens=4000, seed=3, progress=False,
              batch_bytes=16_000, chunk_bytes=8192)
    r1 = prepare([corpus], tmp_path / "w1", workers=1, **kw)
    r2 = prepare([corpus], tmp_path / "w2", workers=2, **kw)
    a, b = shard_bytes(tmp_path / "w1"), shard_bytes(tmp_path / "w2")
    assert len(a) > 4 and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)
    assert r1["split"] == r2["split"] and r1["dedup"]["exact_duplicates"] == 20
    # another seed moves documents between train and val
    r3 = prepare([corpus], tmp_path / "s4", workers=1, **{**kw, "seed": 4})
    assert r3["split"]["val"]["tokens"] != r1["split"]["val"]["tokens"]


def test_split_does_not_depend_on_input_order(tmp_path):
    rng = random.Random(9)
    docs = [random_doc(rng, WORDS, 40) for _ in range(200)]
    write_jsonl(tmp_path / "fwd.jsonl", docs)
    write_jsonl(tmp_path / "rev.jsonl", docs[::-1])
    run([tmp_path / "fwd.jsonl"], tmp_path / "o1", val_fraction=0.1)
    run([tmp_path / "rev.jsonl"], tmp_path / "o2", val_fraction=0.1)

    def val_docs(out):
        ids = load_prepared(out).val[0:]
        return {bytes(x[:-1].tolist()).decode() for x in np.split(ids, np.flatnonzero(ids == 256) + 1)[:-1]}

    v1, v2 = val_docs(tmp_path / "o1"), val_docs(tmp_path / "o2")
    assert v1 == v2 and 5 <= len(v1) <= 40          # ~10% of 200, binomial spread


def test_small_corpus_still_gets_a_validation_document(tmp_path):
    rng = random.Random(0)
    (tmp_path / "one.txt").write_text("\n\n".join(random_doc(rng, WORDS, 100) for _ in range(12)), encoding="utf-8")
    report = run([tmp_path / "one.txt"], tmp_path / "out", val_fraction=0.01, chunk_bytes=1500)
    assert report["split"]["val"]["documents"] == 1 and report["split"]["train"]["documents"] >= 3


def test_manifest_shards_and_load(corpus, tmp_path):
    out = tmp_path / "out"
    report = run([corpus], out, shard_tokens=10_000, val_fraction=0.1)
    m = json.loads((out / "manifest.json").read_text())
    assert m["version"] == 1 and m["dtype"] == "uint16" and m["tokenizer"]["fingerprint"] == ByteTokenizer().fingerprint()
    assert m["report"] == report and m["settings"]["shard_tokens"] == 10_000
    data = load_prepared(out)
    assert data.tokenizer_path == out / "tokenizer.json" and data.eot_id == 256 and data.vocab_size == 257
    for name, stream in (("train", data.train), ("val", data.val)):
        shards = m["shards"][name]
        assert len(stream) == sum(s["tokens"] for s in shards) == report["split"][name]["tokens"]
        assert all(s["tokens"] == 10_000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 10_000
        whole = np.concatenate([np.load(out / s["file"], allow_pickle=False) for s in shards])
        assert np.array_equal(stream[0:len(stream)], whole)
        assert whole[-1] == 256 and np.count_nonzero(whole == 256) == report["split"][name]["documents"]
    assert report["input"]["files"] == 3 and report["kept"]["documents"] == report["input"]["documents"] - 20
    assert is_prepared_dir(out) and not is_prepared_dir(tmp_path) and not is_prepared_dir(tmp_path / "nope")


@given(st.lists(st.integers(0, 40), min_size=1, max_size=6), st.integers(-60, 200), st.integers(-60, 200))
def test_token_stream_slices_like_one_array(sizes, i, j):
    arrays = [np.arange(sum(sizes[:k]), sum(sizes[:k + 1]), dtype=np.uint16) for k in range(len(sizes))]
    ts = TokenStream(arrays)
    ref = np.concatenate(arrays)
    assert len(ts) == len(ref)
    got = ts[i:j]
    assert isinstance(got, np.ndarray) and np.array_equal(got, ref[i:j]) and got.dtype == np.uint16
    if -len(ref) <= i < len(ref):
        assert ts[i] == ref[i]
    else:
        with pytest.raises(IndexError):
            ts[i]


class ListOnly(ByteTokenizer):
    encode_batch_flat = None   # only the list API, like BPETokenizer today


def test_flat_and_list_encode_paths_write_the_same_shards(corpus, tmp_path):
    run([corpus], tmp_path / "flat", shard_tokens=7000, val_fraction=0.2)
    run([corpus], tmp_path / "list", tok=ListOnly(), shard_tokens=7000, val_fraction=0.2)
    a, b = shard_bytes(tmp_path / "flat"), shard_bytes(tmp_path / "list")
    assert len(a) > 5 and all(a[k] == b[k] for k in a) and a.keys() == b.keys()


class BigVocab(ByteTokenizer):
    vocab_size = 70_000
    eot_id = 69_999


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [random_doc(random.Random(i), WORDS, 30) for i in range(5)])
    run([tmp_path / "a.jsonl"], tmp_path / "out", tok=BigVocab())
    data = load_prepared(tmp_path / "out")
    assert data.manifest["dtype"] == "uint32" and data.train.dtype == np.uint32
    assert 69_999 in data.train[0:len(data.train)]


def test_output_is_atomic_and_guarded(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [random_doc(random.Random(i), WORDS, 30) for i in range(5)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a prepared directory"):
        run([tmp_path / "a.jsonl"], out)
    assert (out / "notes.txt").read_text() == "mine"
    out2 = tmp_path / "out2"
    run([tmp_path / "a.jsonl"], out2)
    with pytest.raises(ValueError, match="overwrite"):
        run([tmp_path / "a.jsonl"], out2)
    run([tmp_path / "a.jsonl"], out2, overwrite=True, seed=1)
    assert load_prepared(out2).manifest["settings"]["seed"] == 1

    class Exploding(ByteTokenizer):
        def encode_batch_flat(self, texts, allowed_special="all"):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run([tmp_path / "a.jsonl"], tmp_path / "out3", tok=Exploding())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out", "out2"]   # no temp dir left
    # a damaged prepared directory is refused with a clear message
    (out2 / "train_000000.npy").write_bytes(b"junk")
    with pytest.raises(ValueError):
        load_prepared(out2)
    (out2 / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="manifest"):
        load_prepared(out2)


def test_real_bpe_tokenizer_trained_in_the_pipeline(corpus, tmp_path):
    report = prepare([corpus], tmp_path / "out", None, vocab_size=400, progress=False, dedup="exact")
    data = load_prepared(tmp_path / "out")
    tok = BPETokenizer.load(data.tokenizer_path)
    assert tok.vocab_size == 400 == data.vocab_size and data.manifest["tokenizer"]["fingerprint"] == tok.fingerprint()
    ids = data.train[0:len(data.train)]
    docs = [tok.decode(x.tolist()) for x in np.split(ids, np.flatnonzero(ids == tok.eot_id) + 1)[:-1]]
    assert all(d.endswith("<|endoftext|>") for d in docs)
    assert len(docs) == report["split"]["train"]["documents"]
    # same documents, in the same order, as with the byte tokenizer: the split and dedup do
    # not depend on the tokenizer
    run([corpus], tmp_path / "bytes", dedup="exact")
    byte_ids = load_prepared(tmp_path / "bytes").train[0:]
    byte_docs = [bytes(x[:-1].tolist()).decode() for x in np.split(byte_ids, np.flatnonzero(byte_ids == 256) + 1)[:-1]]
    assert [d[:-len("<|endoftext|>")] for d in docs] == byte_docs
    # 144 merges on random pseudo-words: fewer tokens than bytes (0.75 of them when written)
    assert report["split"]["train"]["tokens"] < 0.85 * sum(len(d.encode()) for d in byte_docs)


def test_cli(tmp_path, capsys):
    from tinylm.cli import main

    docs = [random_doc(random.Random(i), WORDS, 30) for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", docs + ["Write to ann@example.org or call +1 555 010 9999 from 10.1.2.3 today."])
    tok = BPETokenizer().train([random_doc(random.Random(9), WORDS, 300)], 300, progress=False)
    tok.save(tmp_path / "bpe.json")
    rc = main(["prepare", "--data", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"),
               "--tokenizer", str(tmp_path / "bpe.json"), "--no-progress", "--dedup", "near", "--redact",
               "--val-fraction", "0.2", "--shard-tokens", "500", "--seed", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "kept      6 documents" in printed and "wrote" in printed
    m = load_prepared(tmp_path / "out").manifest
    assert m["settings"]["dedup"] == "near" and m["settings"]["clean"]["redact"] and m["settings"]["seed"] == 2
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "bpe.json").read_bytes()
    assert m["report"]["redacted"] == {"email": 1, "ip": 1, "phone": 1}
    data = load_prepared(tmp_path / "out")
    text = "".join(tok.decode(s[0:].tolist()) for s in (data.train, data.val))
    assert "Write to [EMAIL] or call [PHONE] from [IP] today." in text and "ann@" not in text
    rc = main(["prepare", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o2"), "--no-progress"])
    assert rc == 2 and "input not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prepare", "--data", "x", "--out", "y", "--dedup", "fuzzy"])


def test_cli_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, tinylm.data.cli; "
            "print('numba' in sys.modules, 'tinylm.data.pipeline' in sys.modules, 'tinylm.data.textscan' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split() == ["False", "False", "False"]


def test_tokenizer_training_text_is_train_only_and_capped(tmp_path):
    from tinylm.data.pipeline import _REC, _train_texts

    recs = [(0.01, "val doc"), (0.5, "a" * 10), (0.7, "b" * 10), (0.9, "c" * 10)]
    with open(tmp_path / "docs.bin", "wb") as f:
        for u, t in recs:
            f.write(_REC.pack(u, len(t.encode())) + t.encode())
    assert list(_train_texts(tmp_path, 0.05, 10**9)) == ["a" * 10, "b" * 10, "c" * 10]
    assert list(_train_texts(tmp_path, 0.05, 15)) == ["a" * 10, "b" * 10]   # stops once 15 chars are used


def test_bad_start_method_is_a_clear_error(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", [random_doc(random.Random(i), WORDS, 30) for i in range(3)])
    monkeypatch.setenv("TINYLM_MP_START", "teleport")
    with pytest.raises(ValueError, match="TINYLM_MP_START"):
        run([tmp_path / "a.jsonl"], tmp_path / "out", workers=2)
    assert not (tmp_path / "out").exists() and len(list(tmp_path.iterdir())) == 1
