"""``BPETokenizer``: byte-level BPE (GPT-2 style) with training, encoding, decoding and files.

A token is a byte string; ids 0..255 of a fresh or trained tokenizer are the 256 single bytes in
GPT-2's order (``gpt2.GPT2_BYTE_ORDER``), merged tokens follow in creation order and special
tokens come last (GPT-2's own layout: "<|endoftext|>" is 50256). Any input encodes, invalid
UTF-8 included (``encode_bytes``), because every byte is a token.

Pipeline: special tokens are cut out first (only those allowed), the rest is pre-tokenized
(GPT-2 pattern: the Numba scanner in ``_pretok.py``; any other pattern: the `regex` package) and
each pre-token is merged by rank (``_encode.py``). Training: ``train.py``.

File format (``save``/``load``), JSON, version 1::

    {"format": "tinylm-bpe", "version": 1, "pattern": "...",
     "special_tokens": {"<|endoftext|>": 4095},
     "vocab": ["!", "\\"", ..., "Ġthe", null, ...],   # id -> token in GPT-2 characters; null = special
     "merges": [[left id, right id], ...]}            # rank order; result = id of the joined bytes

``fingerprint()`` is the sha256 of that object serialised canonically (sorted keys, ASCII, no
spaces), independent of how the file is laid out. Left out: BPE dropout, normalisation
(NFC etc.), HF's ``tokenizer.json``, parallel encoding (the kernels hold the GIL on purpose:
the pre-token cache is shared state; use processes, each loading the JSON file). References: Sennrich et al. 2016; Radford et al. 2019
(GPT-2 ``encoder.py``); minbpe's file layout.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
from typing import Iterable

import numpy as np

from tinylm._files import read_json
from tinylm.tokenizer.gpt2 import (GPT2_BYTE_ORDER, GPT2_PATTERN, read_merges_txt, read_vocab_json, str_to_token,
                                   token_to_str, write_gpt2_files)
from tinylm.tokenizer.train import WordCounter, regex_pieces, to_utf8, train_merges

FORMAT = "tinylm-bpe"
VERSION = 1
EOT = "<|endoftext|>"


class BPETokenizer:
    """Byte-level BPE tokenizer.

    >>> tok = BPETokenizer().train("aaabdaaabac", 259, special_tokens=(), progress=False)
    >>> tok.decode(tok.encode("aaabdaaabac")), len(tok.encode("aaabdaaabac"))
    ('aaabdaaabac', 5)
    """

    def __init__(self, pattern: str = GPT2_PATTERN):
        import regex

        try:
            self._rx = regex.compile(pattern)
        except (regex.error, TypeError) as e:
            raise ValueError(f"pre-tokenizer pattern {pattern!r} does not compile: {e}") from None
        self.pattern = pattern
        self._set_model([bytes([b]) for b in GPT2_BYTE_ORDER], [], {})

    # ---- the model ------------------------------------------------------------------------
    def _set_model(self, tokens: list, merges: list, special_tokens: dict, where: str = "tokenizer") -> None:
        """Install tokens (id -> bytes, None at special ids), merges and specials, checking them."""
        index: dict[bytes, int] = {}
        for i, t in enumerate(tokens):
            if t is None:
                continue
            if t in index:
                raise ValueError(f"{where}: ids {index[t]} and {i} are the same token {token_to_str(t)!r}")
            index[t] = i
        missing = [b for b in range(256) if bytes([b]) not in index]
        if missing:
            raise ValueError(f"{where}: the single byte {missing[0]} (GPT-2 character {token_to_str(bytes([missing[0]]))!r}) "
                             f"has no token; byte-level BPE needs all 256")
        for name, i in special_tokens.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: special token {name!r} must be a non-empty string")
            if not (0 <= i < len(tokens)) or tokens[i] is not None:
                raise ValueError(f"{where}: special token {name!r} has id {i}, which is not a free slot")
        if sum(t is None for t in tokens) != len(special_tokens) or len(set(special_tokens.values())) != len(special_tokens):
            raise ValueError(f"{where}: every null vocab entry must be exactly one special token's id")
        ma = np.empty(len(merges), np.int64)
        mb = np.empty(len(merges), np.int64)
        mres = np.empty(len(merges), np.int64)
        for r, (a, b) in enumerate(merges):
            for x in (a, b):
                if not (0 <= x < len(tokens)) or tokens[x] is None:
                    raise ValueError(f"{where}: merge {r} ({a}, {b}): id {x} is not an ordinary token")
            res = index.get(tokens[a] + tokens[b])
            if res is None:
                raise ValueError(f"{where}: merge {r} ({token_to_str(tokens[a])!r}, {token_to_str(tokens[b])!r}): "
                                 f"the merged token is not in the vocab")
            ma[r], mb[r], mres[r] = a, b, res
        self._tokens = list(tokens)
        self._merges = [(int(a), int(b)) for a, b in merges]
        self.special_tokens = dict(special_tokens)
        self._index = index
        self._id_bytes = list(tokens)
        for name, i in self.special_tokens.items():
            self._id_bytes[i] = name.encode("utf-8")
        self._byte_to_id = np.array([index[bytes([b])] for b in range(256)], np.int64)
        self._ma, self._mb, self._mres = ma, mb, mres
        self._kernel_state = None  # rank table, cache: built at first encode (imports Numba)

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get(EOT)

    @property
    def merges(self) -> list[tuple[int, int]]:
        return list(self._merges)

    def add_special_tokens(self, names: Iterable[str]) -> list[int]:
        """Add special tokens after the current vocabulary (ids vocab_size, vocab_size + 1, ...)
        and return the id of each name; a name that already is a special token keeps its id.
        Ordinary ids and merges are unchanged, so text encodes as before (the file format is
        unchanged too: a special token is a null vocab entry plus its ``special_tokens`` id).

        >>> tok = BPETokenizer()
        >>> tok.add_special_tokens(["<|user|>", "<|end|>"]), tok.vocab_size
        ([256, 257], 258)
        """
        names = list(dict.fromkeys(names))
        for s in names:
            if not isinstance(s, str) or not s:
                raise ValueError(f"special token {s!r} must be a non-empty string")
        new = [s for s in names if s not in self.special_tokens]
        if new:
            n = len(self._tokens)
            specials = dict(self.special_tokens, **{s: n + k for k, s in enumerate(new)})
            self._set_model(self._tokens + [None] * len(new), self._merges, specials)
        return [self.special_tokens[s] for s in names]

    def token_bytes(self, i: int) -> bytes:
        """Bytes of token ``i`` (a special token's UTF-8)."""
        return self._id_bytes[i]

    # ---- training -------------------------------------------------------------------------
    def train(self, text_or_texts, vocab_size: int, special_tokens: Iterable[str] = (EOT,), progress: bool = True):
        """Learn merges from a str (one document) or an iterable of str (one document each).

        ``vocab_size`` counts the 256 bytes, the merges and the special tokens; a corpus that
        runs out of pairs stops short of it. Returns self.
        """
        specials = list(dict.fromkeys(special_tokens))
        try:
            vocab_size = operator.index(vocab_size)  # int or NumPy int, not 4096.0
        except TypeError:
            raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}") from None
        if vocab_size < 256 + len(specials):
            raise ValueError(f"vocab_size must be an int >= 256 + {len(specials)} special tokens, got {vocab_size!r}")
        wc = WordCounter(self.pattern, specials)
        if isinstance(text_or_texts, str):
            wc.add_text(text_or_texts)
        else:
            docs = text_or_texts
            if progress:
                from tqdm import tqdm

                docs = tqdm(docs, unit="doc", desc="counting", leave=False, mininterval=1.0)
            for t in docs:
                wc.add_text(t)
        return self._train_from_counter(wc, vocab_size, specials, progress)

    def _train_from_counter(self, wc: WordCounter, vocab_size: int, specials: list, progress: bool):
        tokens, merges = train_merges(wc, vocab_size - len(specials), progress)
        n = len(tokens)
        self._set_model(tokens + [None] * len(specials), merges, {s: n + k for k, s in enumerate(specials)})
        return self

    # ---- encoding -------------------------------------------------------------------------
    def _state(self):
        if self._kernel_state is None:
            from tinylm.tokenizer import _encode, _pretok

            keys, vals = _encode.build_rank_table(self._ma, self._mb, self._mres)
            table = _pretok.class_table() if self.pattern == GPT2_PATTERN else np.zeros(1, np.uint8)
            self._kernel_state = (_encode, table, keys, vals, _encode.new_cache())
        return self._kernel_state

    def _encode_ordinary(self, docs: list[bytes] | list[str], is_bytes: bool) -> tuple[np.ndarray, np.ndarray]:
        enc, table, keys, vals, cache = self._state()
        if self.pattern == GPT2_PATTERN:
            bs = docs if is_bytes else [to_utf8(d) for d in docs]
            spans = np.zeros(0, np.int64)
        else:  # `regex` finds the pieces; the kernel merges them
            bs, lens = [], []
            for d in docs:
                text = d.decode("utf-8", "surrogateescape") if is_bytes else d
                pieces = regex_pieces(self._rx, text)[0]
                pb = [p.encode("utf-8", "surrogateescape") if is_bytes else to_utf8(p) for p in pieces]
                bs.append(b"".join(pb))
                lens.extend(len(p) for p in pb)
            spans = np.cumsum(np.array(lens, np.int64))
        if len(bs) == 1:  # one text: no cumsum, no join (np.cumsum took 1/6 of a 200-char call, cProfile)
            ends = np.array([len(bs[0])], np.int64)
            buf = np.frombuffer(bs[0], np.uint8)
        else:
            ends = np.cumsum(np.array([len(b) for b in bs], np.int64))
            buf = np.frombuffer(b"".join(bs), np.uint8)
        return enc.encode_all(buf, ends, spans, table, self._byte_to_id, keys, vals, cache)

    def _allowed(self, allowed_special) -> dict[str, int]:
        if allowed_special == "all":
            return self.special_tokens
        if allowed_special == "none" or not allowed_special:
            return {}
        if isinstance(allowed_special, str):
            raise ValueError(f"allowed_special must be 'all', 'none' or a set of strings, got {allowed_special!r}")
        unknown = set(allowed_special) - set(self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special: {sorted(unknown)} are not special tokens of this tokenizer")
        return {s: self.special_tokens[s] for s in allowed_special}

    def encode(self, text: str, allowed_special="all") -> list[int]:
        """Ids of ``text``. Allowed special tokens in the text become their ids; others (and
        all of them with ``allowed_special="none"``) are encoded as ordinary text."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes str, got {type(text).__name__} (use encode_bytes for bytes)")
        allowed = self._allowed(allowed_special)
        if allowed and any(s in text for s in allowed):
            import regex

            rx = regex.compile("(" + "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")")
            parts = rx.split(text)  # text, special, text, special, ..., text
            ids, ends = self._encode_ordinary(parts[0::2], False)
            out, prev = [], 0
            for k, e in enumerate(ends.tolist()):
                out.extend(ids[prev:e].tolist())
                prev = e
                if 2 * k + 1 < len(parts):
                    out.append(allowed[parts[2 * k + 1]])
            return out
        return self._encode_ordinary([text], False)[0].tolist()

    def encode_batch(self, texts: Iterable[str], allowed_special="all") -> list[list[int]]:
        """``[encode(t) for t in texts]``, in one kernel call when no special token appears."""
        texts = list(texts)
        allowed = self._allowed(allowed_special)
        if allowed and any(s in t for t in texts for s in allowed):
            return [self.encode(t, allowed_special) for t in texts]
        if not texts:
            return []
        ids, ends = self._encode_ordinary(texts, False)
        starts = np.concatenate([[0], ends[:-1]])
        return [ids[s:e].tolist() for s, e in zip(starts.tolist(), ends.tolist())]

    def encode_bytes(self, b: bytes) -> list[int]:
        """Ids of raw bytes (no special tokens); invalid UTF-8 is pre-tokenized as "other"
        characters, one per byte."""
        return self._encode_ordinary([bytes(b)], True)[0].tolist()

    # ---- decoding -------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= len(self._id_bytes)):
            bad = next(i for i in ids if not 0 <= i < len(self._id_bytes))
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {len(self._id_bytes)}")
        return b"".join([self._id_bytes[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- files ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "pattern": self.pattern,
                "special_tokens": dict(self.special_tokens),
                "vocab": [None if t is None else token_to_str(t) for t in self._tokens],
                "merges": [[a, b] for a, b in self._merges]}

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON of ``to_dict()``: equal iff the tokenizers are."""
        canon = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode("ascii")).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON file (one vocab entry / merge per line), atomically."""
        d = self.to_dict()
        head = {k: d[k] for k in ("format", "version", "pattern", "special_tokens")}
        lines = [json.dumps(head, ensure_ascii=False)[:-1] + ","]
        lines.append(' "vocab": [\n  ' + ",\n  ".join(json.dumps(t, ensure_ascii=False) for t in d["vocab"]) + "],")
        lines.append(' "merges": [\n  ' + ",\n  ".join(f"[{a}, {b}]" for a, b in d["merges"]) + "]}")
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Read a file written by ``save``; anything malformed is a ValueError naming the key."""
        return cls.from_dict(read_json(path), where=str(path))

    @classmethod
    def from_dict(cls, d, where: str = "tokenizer") -> "BPETokenizer":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object at the top level")
        if d.get("format") != FORMAT:
            raise ValueError(f"{where}: key 'format' must be {FORMAT!r}, got {d.get('format')!r}")
        if d.get("version") != VERSION:
            raise ValueError(f"{where}: key 'version' is {d.get('version')!r}; this tinylm reads version {VERSION}")
        for key, typ in (("pattern", str), ("special_tokens", dict), ("vocab", list), ("merges", list)):
            if not isinstance(d.get(key), typ):
                raise ValueError(f"{where}: key {key!r} must be a {typ.__name__}, got {type(d.get(key)).__name__}")
        extra = set(d) - {"format", "version", "pattern", "special_tokens", "vocab", "merges"}
        if extra:
            raise ValueError(f"{where}: unknown keys {sorted(extra)}")
        tokens = []
        for i, s in enumerate(d["vocab"]):
            t = None if s is None else str_to_token(s) if isinstance(s, str) and s else False
            if t is None and s is not None or t is False:
                raise ValueError(f"{where}: vocab[{i}] = {s!r} is not a non-empty string of GPT-2 byte characters or null")
            tokens.append(t)
        for k, v in d["special_tokens"].items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{where}: special_tokens[{k!r}] must be an integer id, got {v!r}")
        merges = []
        for r, m in enumerate(d["merges"]):
            if not (isinstance(m, list) and len(m) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in m)):
                raise ValueError(f"{where}: merges[{r}] must be a pair of integer ids, got {m!r}")
            merges.append((m[0], m[1]))
        tok = cls(d["pattern"])
        tok._set_model(tokens, merges, d["special_tokens"], where)
        return tok

    @classmethod
    def from_gpt2_files(cls, vocab_json, merges_txt, special_tokens: Iterable[str] | None = None,
                        pattern: str = GPT2_PATTERN) -> "BPETokenizer":
        """Load GPT-2's ``vocab.json`` + ``merges.txt`` (or any byte-level BPE in that layout).

        Special tokens: those named, else every vocab entry that is neither a single byte nor
        the result of a merge (GPT-2's "<|endoftext|>"), or that uses characters outside
        GPT-2's byte table.
        """
        vocab = read_vocab_json(vocab_json)
        pairs = read_merges_txt(merges_txt)
        n = max(vocab.values()) + 1
        if n != len(vocab):
            missing = next(i for i in range(n) if i not in set(vocab.values()))
            raise ValueError(f"{vocab_json}: ids must be 0..{len(vocab) - 1} without gaps; id {missing} is missing")
        results = set()
        merges = []
        for lineno, (a, b) in enumerate(pairs, 1):
            for s in (a, b):
                if s not in vocab:
                    raise ValueError(f"{merges_txt}: merge {lineno} ({a} {b}): {s!r} is not in {vocab_json}")
            merges.append((vocab[a], vocab[b]))
            results.add(a + b)
        if special_tokens is None:
            specials = {s for s in vocab if len(s) > 1 and s not in results or str_to_token(s) is None}
        else:
            specials = set(special_tokens)
            for s in specials:
                if s not in vocab:
                    raise ValueError(f"{vocab_json}: special token {s!r} is not in the vocab")
        tokens: list = [None] * n
        for s, i in vocab.items():
            if s not in specials:
                t = str_to_token(s)
                if t is None:
                    raise ValueError(f"{vocab_json}: key {s!r} has characters outside GPT-2's byte table")
                tokens[i] = t
        tok = cls(pattern)
        tok._set_model(tokens, merges, {s: vocab[s] for s in specials}, where=f"{vocab_json} + {merges_txt}")
        return tok

    def to_gpt2_files(self, dirpath) -> tuple[str, str]:
        """Write ``vocab.json`` + ``merges.txt`` into ``dirpath``; returns their paths."""
        vocab = {}
        for i, t in enumerate(self._tokens):
            if t is not None:
                vocab[token_to_str(t)] = i
        for s, i in self.special_tokens.items():
            if s in vocab:
                raise ValueError(f"special token {s!r} spells the same GPT-2 string as token {vocab[s]}")
            vocab[s] = i
        merges = [(token_to_str(self._tokens[a]), token_to_str(self._tokens[b])) for a, b in self._merges]
        return write_gpt2_files(dirpath, vocab, merges)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, specials={len(self.special_tokens)})"
