"""Tokenizer files: save/load, fingerprint, GPT-2 vocab.json + merges.txt, malformed input,
and the ``tinylm tokenizer`` CLI end to end. Everything is written under tmp_path."""
import inspect
import json
import sys
import textwrap

import pytest

from tinylm.tokenizer import BPETokenizer
from tinylm.tokenizer.cli import read_pieces

CORPUS = inspect.getsource(textwrap) + "\n<|endoftext|>\n" + inspect.getsource(json)


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer().train(CORPUS, 400, progress=False)


SAMPLES = ["def wrap(text, width=70):\n    return text", "日本語 😀 \x00 ok", "", "a<|endoftext|>b"]


def test_save_load_roundtrip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    back = BPETokenizer.load(path)
    assert back.fingerprint() == tok.fingerprint()
    assert back.merges == tok.merges and back.special_tokens == tok.special_tokens
    assert back.vocab_size == tok.vocab_size == 400 and back.eot_id == 399
    for s in SAMPLES:
        assert back.encode(s) == tok.encode(s)
    json.loads(path.read_text())  # plain JSON


def test_fingerprint_tracks_content(tok):
    other = BPETokenizer().train(CORPUS, 399, progress=False)
    assert other.fingerprint() != tok.fingerprint()
    assert BPETokenizer().train(CORPUS, 400, progress=False).fingerprint() == tok.fingerprint()  # deterministic
    assert len(tok.fingerprint()) == 64


def _saved(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    return json.loads(path.read_text())


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(version=2), "'version' is 2"),
    (lambda d: d.update(format="other"), "'format' must be"),
    (lambda d: d.pop("merges"), "'merges' must be a list"),
    (lambda d: d.update(extra=1), "unknown keys"),
    (lambda d: d["vocab"].__setitem__(5, 7), r"vocab\[5\]"),
    (lambda d: d["vocab"].__setitem__(5, "€"), r"vocab\[5\]"),
    (lambda d: d["vocab"].__setitem__(300, d["vocab"][299]), "are the same token"),
    (lambda d: d["merges"].__setitem__(3, [1]), r"merges\[3\]"),
    (lambda d: d["merges"].__setitem__(3, [1, 10**6]), "merge 3"),
    (lambda d: d["merges"].__setitem__(3, [0, 0]), "merge 3"),  # "!!" is not a token here
    (lambda d: d["special_tokens"].update({"<|x|>": 5}), "not a free slot"),
    (lambda d: d["special_tokens"].update({"<|x|>": "5"}), "must be an integer"),
    (lambda d: d["vocab"].__setitem__(0, None), "null vocab entry|single byte"),
])
def test_load_rejects_malformed(tok, tmp_path, edit, message):
    d = _saved(tok, tmp_path)
    edit(d)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message) as e:
        BPETokenizer.load(bad)
    assert "bad.json" in str(e.value)


def test_load_rejects_non_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "tinylm-bpe",\n "version": 1,,}')
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON \(line 2"):
        BPETokenizer.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        BPETokenizer.load(bad)


# ---- GPT-2 files ------------------------------------------------------------------------------

def test_gpt2_files_roundtrip(tok, tmp_path):
    vpath, mpath = tok.to_gpt2_files(tmp_path / "gpt2")
    vocab = json.loads(open(vpath, encoding="utf-8").read())
    assert vocab["!"] == 0 and vocab["Ġ"] == 220 and vocab["<|endoftext|>"] == 399  # GPT-2's layout
    lines = open(mpath, encoding="utf-8").read().splitlines()
    assert lines[0].startswith("#version") and len(lines) == 1 + len(tok.merges)
    back = BPETokenizer.from_gpt2_files(vpath, mpath)  # "<|endoftext|>" found as a special
    assert back.fingerprint() == tok.fingerprint()
    for s in SAMPLES:
        assert back.encode(s) == tok.encode(s)


def test_gpt2_files_rejected_with_line(tok, tmp_path):
    vpath, mpath = tok.to_gpt2_files(tmp_path / "g")
    lines = open(mpath, encoding="utf-8").read().splitlines()
    lines[4] = "onlyonetoken"
    bad = tmp_path / "merges.txt"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges.txt: line 5"):
        BPETokenizer.from_gpt2_files(vpath, bad)
    lines[4] = "Ġ zzzunknown"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merge 4 .*zzzunknown"):
        BPETokenizer.from_gpt2_files(vpath, bad)
    badv = tmp_path / "vocab.json"
    badv.write_text('{"a": 0, "b": 0}')
    with pytest.raises(ValueError, match="both have id 0"):
        BPETokenizer.from_gpt2_files(badv, mpath)


# ---- CLI --------------------------------------------------------------------------------------

def test_read_pieces_cuts_at_line_ends_and_names_bad_utf8(tmp_path):
    p = tmp_path / "a.txt"
    text = "".join(f"line {i} é\n" for i in range(500)) + "tail"
    p.write_text(text, encoding="utf-8")
    pieces = list(read_pieces(str(p), piece_bytes=100))
    assert "".join(pieces) == text and all(x.endswith("\n") for x in pieces[:-1]) and len(pieces) > 10
    p.write_bytes(b"good line\n" * 20 + b"bad \xff here\n")
    with pytest.raises(ValueError, match=r"a.txt: not valid UTF-8 at byte 204"):
        list(read_pieces(str(p), piece_bytes=64))
    p.write_bytes(b"x" * 63 + "é".encode() + b"\xe9 end")  # é cut by a read, then a bad byte
    with pytest.raises(ValueError, match=r"a.txt: not valid UTF-8 at byte 65"):
        list(read_pieces(str(p), piece_bytes=64))
    p.write_text("ab" * 5000, encoding="utf-8")  # no line end, no space: cut anyway
    pieces = list(read_pieces(str(p), piece_bytes=64))
    assert "".join(pieces) == "ab" * 5000 and max(map(len, pieces)) <= 16 * 64 + 64


def test_cli_train_encode_decode(tmp_path, capsys, monkeypatch):
    from tinylm.cli import main

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(CORPUS[:30000], encoding="utf-8")
    b.write_text(CORPUS[30000:], encoding="utf-8")
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--data", str(a), str(b), "--vocab-size", "350", "--out", str(out), "--no-progress"]) == 0
    assert "350 tokens" in capsys.readouterr().err
    tok = BPETokenizer.load(out)
    assert tok.vocab_size == 350 and tok.eot_id == 349
    # the CLI streams each file as one document: same merges as training on the two texts
    assert tok.merges == BPETokenizer().train([CORPUS[:30000], CORPUS[30000:]], 350, progress=False).merges

    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--text", "def wrap(text):"]) == 0
    ids = capsys.readouterr().out.split()
    assert [int(i) for i in ids] == tok.encode("def wrap(text):")
    assert main(["tokenizer", "decode", "--tokenizer", str(out), *ids]) == 0
    assert capsys.readouterr().out == "def wrap(text):\n"

    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("from stdin"))
    assert main(["tokenizer", "encode", "--tokenizer", str(out)]) == 0
    assert [int(i) for i in capsys.readouterr().out.split()] == tok.encode("from stdin")


def test_cli_errors_are_one_line(tmp_path, capsys):
    from tinylm.cli import main

    assert main(["tokenizer", "train", "--data", str(tmp_path / "nope.txt"), "--vocab-size", "300", "--out", str(tmp_path / "t.json")]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["tokenizer", "encode", "--tokenizer", str(bad), "--text", "x"]) == 2
    assert "bad.json: key 'format'" in capsys.readouterr().err
    good = tmp_path / "good.json"
    BPETokenizer().save(good)
    assert main(["tokenizer", "decode", "--tokenizer", str(good), "1", "x2"]) == 2
    assert "'x2'" in capsys.readouterr().err
