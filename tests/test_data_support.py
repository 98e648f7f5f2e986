"""Helpers shared by the tests of tinylm.data (no tests here).

``ByteTokenizer`` is a stand-in with the ``BPETokenizer`` API (load/save/train/encode/
encode_batch/vocab_size/eot_id/fingerprint): ids 0-255 are UTF-8 bytes, 256 is
``<|endoftext|>``. It keeps a test's failure about the pipeline, not the tokenizer; the
pipeline tests run with both it and the real ``BPETokenizer`` (``make_tokenizer``), and the
determinism, streaming and CLI tests with the real one only.
"""
from __future__ import annotations

import hashlib
import json
import random
import string


class ByteTokenizer:
    vocab_size = 257
    eot_id = 256

    def train(self, texts, vocab_size, special_tokens=("<|endoftext|>",), progress=False):
        for _ in texts:
            pass
        return self

    def encode(self, text, allowed_special="none"):
        return list(text.encode("utf-8"))

    def encode_batch(self, texts, allowed_special="all"):
        return [self.encode(t) for t in texts]

    def encode_batch_flat(self, texts, allowed_special="all"):
        """The optional fast path ``prepare`` uses when a tokenizer has it: all ids in one
        array and the end offset of each document."""
        import numpy as np

        data = [t.encode("utf-8") for t in texts]
        return np.frombuffer(b"".join(data), dtype=np.uint8).astype(np.int64), np.cumsum([len(d) for d in data])

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def fingerprint(self):
        return hashlib.sha256(b"byte-tokenizer-v1").hexdigest()

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"kind": "byte-tokenizer", "version": 1}, f)

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            if json.load(f).get("kind") != "byte-tokenizer":
                raise ValueError("not a byte tokenizer")
        return cls()


def make_tokenizer(kind: str):
    """``"bytes"``: the stand-in; ``"bpe"``: the real BPETokenizer, trained (vocab 300) on
    generated text so that the pipeline tests also run through real merges."""
    if kind == "bytes":
        return ByteTokenizer()
    from tinylm.tokenizer import BPETokenizer

    rng = random.Random(123)
    sample = [random_doc(rng, vocabulary(), 200) for _ in range(20)] + ["café naïve € 𝄞 \ufffd 10.0.0.1 [EMAIL]"]
    return BPETokenizer().train(sample, 300, progress=False)


def decode_prepared(out) -> list[str]:
    """Every document of a prepared dir (train, then val), decoded with its own tokenizer;
    checks that each document ends with the end-of-text token."""
    import numpy as np

    from tinylm.data import load_prepared

    data = load_prepared(out)
    if data.manifest["tokenizer"]["fingerprint"] == ByteTokenizer().fingerprint():
        tok = ByteTokenizer()
    else:
        from tinylm.tokenizer import BPETokenizer

        tok = BPETokenizer.load(data.tokenizer_path)
    docs = []
    for stream in (data.train, data.val):
        ids = stream[0:len(stream)]
        assert len(ids) == 0 or ids[-1] == tok.eot_id
        for piece in np.split(ids, np.flatnonzero(ids == tok.eot_id) + 1)[:-1]:
            docs.append(tok.decode(piece[:-1].tolist()))
    return docs


def vocabulary(n=5000, seed=1):
    """n distinct pseudo-words (random letters), the same for a given seed."""
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))))
    return sorted(out)


def random_doc(rng: random.Random, words, n_words=120):
    """A paragraph of random words with some punctuation: distinct docs share ~no 5-grams."""
    out = []
    for i in range(n_words):
        w = rng.choice(words)
        out.append(w.capitalize() if i == 0 or out[-1].endswith(".") else w)
        if rng.random() < 0.08:
            out[-1] += "."
    return " ".join(out) + "."


def write_corpus(root, total_bytes: int, seed: int, part_bytes: int = 2 << 20) -> int:
    """Write ~total_bytes of unique random-word documents (300-3000 words each) into
    alternating .txt (<|endoftext|>-separated) and .jsonl parts; memory stays ~part_bytes.
    Returns the bytes written."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    words = np.array(vocabulary())
    rng = np.random.default_rng(seed)
    written = k = 0
    while written < total_bytes:
        docs, size = [], 0
        while size < part_bytes:
            d = " ".join(words[rng.integers(0, len(words), int(rng.integers(300, 3000)))].tolist()) + "."
            docs.append(d)
            size += len(d) + 1
        if k % 2:
            text, name = "".join(json.dumps({"text": d}) + "\n" for d in docs), f"part{k:03d}.jsonl"
        else:
            text, name = "<|endoftext|>".join(docs), f"part{k:03d}.txt"
        (root / name).write_text(text, encoding="utf-8")
        written += len(text)
        k += 1
    return written
