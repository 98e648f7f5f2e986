"""Inputs: documents out of text, JSONL, gzip and directories, and bad input that is counted,
located (file and line) and never stops the run nor loses the other documents."""
from __future__ import annotations

import gzip
import json
import os
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from test_data_support import decode_prepared, make_tokenizer, random_doc, vocabulary
from tinylm.data import prepare
from tinylm.data import sources
from tinylm.data.sources import SEPARATOR, Issues, SourceOptions, iter_documents, list_files

WORDS = vocabulary()


def docs_of(paths, **kw):
    issues = Issues()
    return [d[0] for d in iter_documents([str(p) for p in paths], SourceOptions(**kw), issues)], issues


def test_separator_splits_documents_and_line_numbers(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first doc\nline 2\n<|endoftext|>second doc\n<|endoftext|>\nthird", encoding="utf-8")
    issues = Issues()
    got = list(iter_documents([str(p)], SourceOptions(), issues))
    assert [d[0] for d in got] == ["first doc\nline 2\n", "second doc\n", "\nthird"]
    assert [d[2] for d in got] == [1, 3, 4]


PIECES = st.sampled_from(["a", "é", "€", "𝄞", " ", "\n", "\n\n", "\r\n", SEPARATOR, "<|", "endoftext|>", "word "])


@given(st.lists(PIECES, max_size=300), st.integers(16, 64), st.integers(1, 40))
def test_text_reader_is_lossless(tmp_path_factory, pieces, chunk, block):
    """Whatever the separators, blank lines, multi-byte characters, chunk size and read-block
    size: documents never contain the separator, and joined they give the text without it."""
    text = "".join(pieces)
    p = tmp_path_factory.mktemp("lossless") / "t.txt"
    p.write_text(text, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "READ_BLOCK", block)
        docs, issues = docs_of([p], chunk_bytes=chunk)
    assert not issues.counts
    assert all(SEPARATOR not in d for d in docs)
    assert "".join(docs) == text.replace(SEPARATOR, "")
    if SEPARATOR not in text:
        # 4 x chunk is the hard cap, + 3 bytes for a character that may not be split
        assert all(len(d.encode()) <= 4 * chunk + 3 for d in docs)
    else:
        assert len(docs) >= text.count(SEPARATOR)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_long_text_is_cut_at_blank_lines(tmp_path, newline):
    rng = random.Random(0)
    paras = [random_doc(rng, WORDS, 60) for _ in range(200)]
    text = (2 * newline).join(paras) + newline
    p = tmp_path / "book.txt"
    p.write_bytes(text.encode("utf-8"))
    docs, _ = docs_of([p], chunk_bytes=4096)
    assert "".join(docs) == text                      # nothing lost, nothing added
    assert len(docs) > 10
    for d in docs[:-1]:
        assert d.endswith(2 * newline) and len(d.encode()) >= 4096
        assert len(d.encode()) < 4096 + max(len(x) for x in paras) + 3


def test_long_jsonl_record_is_cut(tmp_path):
    rng = random.Random(3)
    long = "\n\n".join(random_doc(rng, WORDS, 60) for _ in range(100))
    flat = "x" * 5000
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": long}) + "\n"
                 + json.dumps({"text": flat}) + "\n", encoding="utf-8")
    issues = Issues()
    got = list(iter_documents([str(p)], SourceOptions(chunk_bytes=1000), issues))
    assert got[0] == ("short", str(p), 1)
    pieces = [t for t, _, line in got if line == 2]
    assert "".join(pieces) == long and len(pieces) > 5
    assert all(1000 <= len(t) <= 4000 and t.endswith("\n\n") for t in pieces[:-1])
    assert [t for t, _, line in got if line == 3] == ["x" * 4000, "x" * 1000]


def test_line_without_breaks_is_cut_on_utf8_boundaries(tmp_path):
    text = "é€𝄞a" * 5000                                  # 2-, 3-, 4-byte characters, no newline
    p = tmp_path / "one_line.txt"
    p.write_text(text, encoding="utf-8")
    docs, issues = docs_of([p], chunk_bytes=1000)
    assert "".join(docs) == text and len(docs) > 5 and not issues.counts


def test_gzip_jsonl_and_directory_walk(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("alpha", encoding="utf-8")
    with gzip.open(root / "sub" / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("beta<|endoftext|>gamma")
    with gzip.open(root / "sub" / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "delta"}) + "\n" + json.dumps({"body": "epsilon"}) + "\n")
    (root / "skip.log").write_text("not me", encoding="utf-8")
    (root / ".hidden" / "h.txt").write_text("hidden", encoding="utf-8")
    files = list_files([root], SourceOptions(exclude=("*.log",)))
    assert [os.path.relpath(f, root) for f in files] == ["a.txt", "sub/b.txt.gz", "sub/c.jsonl.gz"]
    docs, issues = docs_of(files, text_field="body")
    assert docs == ["alpha", "beta", "gamma", "delta", "epsilon"] and not issues.counts
    only = list_files([root], SourceOptions(include=("sub/*.gz",)))
    assert [os.path.relpath(f, root) for f in only] == ["sub/b.txt.gz", "sub/c.jsonl.gz"]
    with pytest.raises(FileNotFoundError):
        list_files([tmp_path / "nope"], SourceOptions())


@pytest.mark.parametrize("tok", ["bytes", "bpe"])
def test_bad_input_is_counted_located_and_never_loses_good_documents(tmp_path, tok):
    rng = random.Random(7)
    good = [random_doc(rng, WORDS, 40) for _ in range(8)]
    d = tmp_path / "in"
    d.mkdir()
    (d / "a_good.txt").write_text(good[0] + "<|endoftext|>" + good[1], encoding="utf-8")
    # invalid UTF-8 on line 3 of a document: kept with a replacement character, reported
    (d / "b_bad_utf8.txt").write_bytes(b"line one\nline two\nbad \xff\xfe byte here and more words\n")
    (d / "c_empty.txt").write_text("   \n\t\n", encoding="utf-8")
    lines = [json.dumps({"text": good[2]}), "{not json", json.dumps({"other": "x"}), json.dumps({"text": 5}),
             json.dumps(["text"]), "", json.dumps({"text": ""}), json.dumps({"text": good[3]})]
    (d / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "e_corrupt.txt.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    with gzip.open(d / "f_truncated.txt.gz", "wb") as f:
        f.write(("x" * 50 + "\n").encode() * 20000)
    (d / "f_truncated.txt.gz").write_bytes((d / "f_truncated.txt.gz").read_bytes()[:300])
    (d / "g_binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    os.symlink(tmp_path / "missing.txt", d / "h_dangling.txt")
    os.mkfifo(d / "i_fifo.txt")
    (d / "j_good.txt").write_text(good[4], encoding="utf-8")
    (d / "k.jsonl").write_bytes(json.dumps({"text": good[5]}).encode() + b"\n" + b'{"text": "caf\xe9 is not UTF-8 here"}\n'
                                + b'{"text": "a lone \\ud800 surrogate in JSON"}\n')

    out = tmp_path / "out"
    report = prepare([d], out, make_tokenizer(tok), progress=False, dedup="exact", val_fraction=0.2,
                     clean=None, shard_tokens=500)
    counts = report["issues"]["counts"]
    assert counts == {"binary": 1, "invalid_utf8": 3, "missing_field": 3, "not_a_file": 1,
                      "not_json": 1, "unreadable": 3}, counts
    where = {(r["kind"], os.path.basename(r["file"]), r["line"]) for r in report["issues"]["records"]}
    assert ("invalid_utf8", "b_bad_utf8.txt", 3) in where
    assert ("not_json", "d.jsonl", 2) in where
    assert {("missing_field", "d.jsonl", n) for n in (3, 4, 5)} <= where
    assert ("invalid_utf8", "k.jsonl", 2) in where and ("invalid_utf8", "k.jsonl", 3) in where
    assert ("binary", "g_binary.txt", 1) in where
    assert ("not_a_file", "i_fifo.txt", None) in where
    assert {f for k, f, _ in where if k == "unreadable"} == {"e_corrupt.txt.gz", "f_truncated.txt.gz",
                                                           "h_dangling.txt"}
    # empty documents: the whitespace-only file and the JSONL "" are dropped by the filter
    assert report["dropped"]["empty"] == 2
    kept = decode_prepared(out)
    for g in good[:6]:
        assert g in kept
    assert any(k.startswith("line one\nline two\nbad \ufffd\ufffd byte") for k in kept)
    assert "caf\ufffd is not UTF-8 here" in kept and "a lone ? surrogate in JSON" in kept
    assert len(kept) == 9
    assert report["kept"]["documents"] == 9
