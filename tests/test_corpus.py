"""``tinylm.corpus.get_tokens`` on raw ``--data``: the inputs it reads (text, gzip, JSONL,
binary skipped), the train/validation split on any input with two windows of tokens, the
cache (reused on resume, temporary directories cleaned up) and bounded memory. Every test
writes only under tmp_path."""
from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tinylm import corpus
from tinylm.corpus import get_tokens

WORDS = ("the quick brown fox jumps over a lazy dog while seven red birds sing near an old house by "
         "the river and children play games until the sun goes down behind green hills").split()


def cfg_for(*data, **kw):
    base = dict(data=[str(d) for d in data], vocab_size=300, corpus_mb=1.0, progress=False, block_size=16)
    return SimpleNamespace(**{**base, **kw})


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def text_of(rng: random.Random, n_lines: int) -> str:
    return "".join(sentence(rng) + "\n" for _ in range(n_lines))


def docs_of(data, stream) -> list[str]:
    """Documents of a token stream (each ends with end-of-text), decoded."""
    tok = data.tokenizer
    ids = np.asarray(stream, dtype=np.int64)
    out = []
    for piece in np.split(ids, np.flatnonzero(ids == tok.eot_id) + 1):
        if len(piece):
            out.append(tok.decode([int(i) for i in piece if i != tok.eot_id]))
    return out


def all_text(data) -> str:
    return "".join(docs_of(data, data.train) + docs_of(data, data.val))


# ---- inputs --------------------------------------------------------------------------------

def test_gzip_is_decompressed_by_suffix_and_by_magic_bytes(tmp_path):
    rng = random.Random(0)
    a, b = text_of(rng, 30), text_of(rng, 30)
    d = tmp_path / "in"
    d.mkdir()
    with gzip.open(d / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write(a)
    (d / "b.dat").write_bytes(gzip.compress(b.encode("utf-8")))  # gzip without the suffix
    data = get_tokens(cfg_for(d), tmp_path / "out")
    text = all_text(data)
    assert a in text and b in text
    assert "\ufffd" not in text


def test_jsonl_is_read_by_its_text_field(tmp_path):
    rng = random.Random(1)
    texts = [text_of(rng, 3) for _ in range(12)]
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    data = get_tokens(cfg_for(p), tmp_path / "out")
    text = all_text(data)
    assert all(t in text for t in texts)
    assert '"text"' not in text and '"id"' not in text


def test_a_bad_jsonl_line_is_an_error_naming_file_and_line(tmp_path):
    rng = random.Random(2)
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": text_of(rng, 40)}) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl.*line 2"):
        get_tokens(cfg_for(p), tmp_path / "out")
    q = tmp_path / "field.jsonl"
    q.write_text(json.dumps({"text": text_of(rng, 40)}) + "\n" + json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"field\.jsonl.*line 2.*'text'"):
        get_tokens(cfg_for(q), tmp_path / "out")
    assert not list((tmp_path / "out" / "data").glob("*.tmp-*"))  # the failed build left nothing


def test_binary_files_are_skipped_counted_and_named(tmp_path, capsys):
    rng = random.Random(3)
    d = tmp_path / "in"
    d.mkdir()
    good = text_of(rng, 60)
    (d / "good.txt").write_text(good, encoding="utf-8")
    (d / "prog").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)       # NUL bytes
    (d / "noise.bin").write_bytes(bytes(rng.randrange(128, 256) for _ in range(4000)))  # no NUL, not UTF-8
    data = get_tokens(cfg_for(d), tmp_path / "out")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "skipped" in line]
    assert len(lines) == 1, err
    assert "2 binary files" in lines[0] and "prog" in lines[0] and "noise.bin" in lines[0]
    assert all_text(data) == good
    # the warning is repeated when the cache is reused
    get_tokens(cfg_for(d), tmp_path / "out")
    assert "2 binary files" in capsys.readouterr().err


# ---- split -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_lines", [37, 39, 40])
def test_a_single_small_file_splits_by_tokens(tmp_path, n_lines):
    text = text_of(random.Random(n_lines), n_lines)
    p = tmp_path / "small.txt"
    p.write_text(text, encoding="utf-8")
    cfg = cfg_for(p)
    data = get_tokens(cfg, tmp_path / "out")
    window = cfg.block_size + 1
    n = len(data.train) + len(data.val)
    assert len(data.train) >= window and len(data.val) >= window
    assert len(data.val) == max(window, round(0.05 * n))                 # the last ~5%, at least one window
    whole = np.concatenate([np.asarray(data.train), np.asarray(data.val)])  # val is the tail, nothing lost
    assert data.tokenizer.decode(whole[:-1].tolist()) == text and whole[-1] == data.tokenizer.eot_id
    assert data.bytes_per_token > 1.0


def test_many_documents_keep_every_20th_for_validation(tmp_path):
    rng = random.Random(5)
    d = tmp_path / "docs"
    d.mkdir()
    texts = [f"document {i}: " + text_of(rng, 2) for i in range(40)]
    for i, t in enumerate(texts):
        (d / f"doc{i:02d}.txt").write_text(t, encoding="utf-8")
    data = get_tokens(cfg_for(d), tmp_path / "out")
    assert docs_of(data, data.val) == [texts[19], texts[39]]
    assert docs_of(data, data.train) == [t for i, t in enumerate(texts) if i % 20 != 19]


def test_too_little_data_says_how_many_tokens_were_found_and_needed(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("hello there\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"tiny\.txt.* \d+ tokens.*at least 34 .*needed"):
        get_tokens(cfg_for(p), tmp_path / "out")


def test_an_empty_directory_says_it_contains_no_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no files"):
        get_tokens(cfg_for(tmp_path / "empty"), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        get_tokens(cfg_for(tmp_path / "missing"), tmp_path / "out")


# ---- cache -----------------------------------------------------------------------------------

def test_resume_with_the_checkpoint_tokenizer_reuses_the_cache(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = random.Random(6)
    for i in range(25):
        (d / f"{i:02d}.txt").write_text(text_of(rng, 5), encoding="utf-8")
    out = tmp_path / "out"
    first = get_tokens(cfg_for(d), out)
    caches = sorted((out / "data").iterdir())
    assert len(caches) == 1
    # what a checkpoint holds: the tokenizer saved again, somewhere else
    (tmp_path / "ckpt").mkdir()
    first.tokenizer.save(tmp_path / "ckpt" / "tokenizer.json")
    again = get_tokens(cfg_for(d), out, tokenizer_path=tmp_path / "ckpt" / "tokenizer.json")
    assert sorted((out / "data").iterdir()) == caches
    np.testing.assert_array_equal(again.train, first.train)
    np.testing.assert_array_equal(again.val, first.val)
    assert again.bytes_per_token == first.bytes_per_token
    # a different tokenizer gets its own cache, encoded with it
    from tinylm.tokenizer import BPETokenizer

    other = BPETokenizer().train([text_of(rng, 50)], 280, progress=False)
    other.save(tmp_path / "other.json")
    third = get_tokens(cfg_for(d), out, tokenizer_path=tmp_path / "other.json")
    assert len(list((out / "data").iterdir())) == 2
    assert third.tokenizer.fingerprint() == other.fingerprint()
    assert all_text(third) == all_text(first)


def test_the_runs_own_output_inside_the_data_dir_is_not_read(tmp_path):
    d = tmp_path / "proj"
    d.mkdir()
    (d / "a.txt").write_text(text_of(random.Random(9), 60), encoding="utf-8")
    first = get_tokens(cfg_for(d), d / "out")        # `--data . --out out`
    (d / "out" / "log.jsonl").write_text("{}\n")     # what a run writes there
    again = get_tokens(cfg_for(d), d / "out")
    assert len(list((d / "out" / "data").iterdir())) == 1
    assert all_text(again) == all_text(first)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_directories_are_removed_with_a_message(tmp_path, capsys):
    p = tmp_path / "a.txt"
    p.write_text(text_of(random.Random(7), 60), encoding="utf-8")
    data_dir = tmp_path / "out" / "data"
    stale = data_dir / f"0123456789abcdef.tmp-{dead_pid()}"
    stale.mkdir(parents=True)
    (stale / "train.npy").write_bytes(b"\0" * 100_000)
    live = data_dir / f"fedcba9876543210.tmp-{os.getpid()}"  # a run still going: kept
    live.mkdir()
    get_tokens(cfg_for(p), tmp_path / "out")
    out = capsys.readouterr().out
    assert not stale.exists() and live.is_dir()
    assert f"removed {stale}" in out and "interrupted" in out
    assert [q.name for q in data_dir.iterdir() if ".tmp-" not in q.name]  # the cache itself


def test_the_cache_is_written_to_a_temporary_dir_and_renamed(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    p.write_text(text_of(random.Random(8), 60), encoding="utf-8")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus, "_write_meta", boom)
    with pytest.raises(KeyboardInterrupt):
        get_tokens(cfg_for(p), tmp_path / "out")
    assert list((tmp_path / "out" / "data").iterdir()) == []


# ---- memory ----------------------------------------------------------------------------------

RSS_SCRIPT = r'''
import json, resource, sys
from pathlib import Path
from types import SimpleNamespace
from tinylm import corpus

corpus.TOKENIZER_TRAIN_BYTES = 4 << 20    # tokenizer trained on a 4 MB sample
small, big, work = sys.argv[1:4]
cfg = lambda d: SimpleNamespace(data=[d], vocab_size=300, corpus_mb=1.0, progress=False, block_size=64)
peak_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
corpus.get_tokens(cfg(small), Path(work) / "warm")   # imports, Numba caches, a tokenizer trained
base = peak_mb()
data = corpus.get_tokens(cfg(big), Path(work) / "big")
print(json.dumps({"base_mb": base, "peak_mb": peak_mb(), "train": len(data.train), "val": len(data.val)}))
'''

GROWTH_MB = 32  # a third of the corpus below


def test_peak_memory_is_bounded_on_a_large_raw_corpus(tmp_path):
    """get_tokens on 96 MiB of raw text across 96 files: the peak RSS grows by under 32 MiB
    (a third of the corpus) over a warm-up run. What stays in memory is one batch of
    documents (~1 MB of text and its ids, ~15 MB with the int64 arrays made from them), the
    tokenizer's word table for a 4 MB sample and the read buffers; the tokens go to disk as
    they are made. Measured: growth 12 MiB (baseline 186 MiB); the reader that held every
    document and id in memory grew by 1,812 MiB on the same corpus. ~10 s."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_data_support import write_corpus

    small, big = tmp_path / "small", tmp_path / "big"
    write_corpus(small, 2 << 20, seed=0, part_bytes=1 << 20)
    size = write_corpus(big, 96 << 20, seed=1, part_bytes=1 << 20)
    work = tmp_path / "work"
    work.mkdir()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(small), str(big), str(work)],
                             capture_output=True, text=True, env=env, timeout=900)
        n_files = len(list(big.iterdir()))
    finally:  # ~260 MB of corpus and tokens: do not leave them in the kept basetemps
        shutil.rmtree(big, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["peak_mb"] - r["base_mb"]
    print(f"corpus {size / 2**20:.0f} MiB in {n_files} files: baseline peak {r['base_mb']:.0f} MiB, "
          f"peak {r['peak_mb']:.0f} MiB, growth {growth:.0f} MiB; {r['train']:,} train tokens")
    assert r["train"] > 20_000_000 and r["val"] > 1_000_000
    assert growth < GROWTH_MB, r


# ---- tokenizer train (the CLI reads files too) ---------------------------------------------

def test_tokenizer_train_on_no_text_is_an_error_and_a_short_vocab_is_said(tmp_path, capsys):
    from tinylm.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--data", str(empty), "--vocab-size", "300", "--out", str(out), "--no-progress"]) == 2
    assert "no text to train on" in capsys.readouterr().err and not out.exists()
    (tmp_path / "d").mkdir()
    assert main(["tokenizer", "train", "--data", str(tmp_path / "d"), "--vocab-size", "300", "--out", str(out)]) == 2
    assert "contains no files" in capsys.readouterr().err
    (tmp_path / "d" / "a.txt").write_text("abab abab", encoding="utf-8")
    assert main(["tokenizer", "train", "--data", str(tmp_path / "d"), "--vocab-size", "300", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "fewer than the 300 asked for" in err, err
