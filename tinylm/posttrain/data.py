"""Post-training data: JSONL records in, rendered token rows and batches out.

Readers (one record per line; a bad line is reported with its file and line and skipped):

- chat (SFT): {"messages": [{"role", "content"}, ...]} (OpenAI / Hugging Face chat format),
  {"prompt", "completion"} (strings, or message lists as TRL allows), Alpaca's
  {"instruction", "input", "output"};
- preference (DPO): {"prompt", "chosen", "rejected"}: strings, or message lists (TRL's
  explicit-prompt format: ``prompt`` the conversation so far, ``chosen`` / ``rejected`` the
  assistant's reply as a one-message list or a string);
- prompts (GRPO, compare): {"prompt": str | messages, ...}; the other keys (e.g. "answer") go
  to the reward function.

Conversations longer than the context are truncated or dropped (``overflow``), and counted; a
conversation with no trained token left after truncation is dropped, so every row trains
something. ``SFTRows`` packs conversations into rows of block_size + 1 tokens (never splitting
one; packed conversations attend to their row-mates, as in GPT pretraining) or pads each to
its own row, and serves shuffled batches from a seeded generator whose state is checkpointed.

Leaves out: streaming datasets larger than memory, per-conversation attention masks in packed
rows, TRL's implicit-prompt preference format (chosen and rejected as whole conversations).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tinylm.posttrain.chat import IGNORE, check_messages

MAX_REPORTED = 10  # bad lines printed one by one; the rest are counted


class Problems:
    """Bad input lines: the first few said one by one, all of them counted."""

    def __init__(self):
        self.lines: list[str] = []
        self.count = 0

    def add(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.lines) < MAX_REPORTED:
            self.lines.append(f"{where}: {why}; skipped")

    def report(self, out=print) -> None:
        for line in self.lines:
            out(line)
        if self.count > len(self.lines):
            out(f"... and {self.count - len(self.lines)} more bad lines skipped")


def read_jsonl(paths, parse, problems: Problems) -> list:
    """``parse(record)`` of every line of every file; a line that is not a JSON object or that
    ``parse`` rejects (ValueError/TypeError/KeyError) is reported and skipped."""
    out = []
    for path in paths:
        path = Path(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    problems.add(where, f"not JSON ({e.msg})")
                    continue
                if not isinstance(rec, dict):
                    problems.add(where, "not a JSON object")
                    continue
                try:
                    out.append(parse(rec))
                except (ValueError, TypeError, KeyError) as e:
                    problems.add(where, str(e))
    return out


def _as_messages(x, default_role: str) -> list[dict]:
    if isinstance(x, str):
        return [{"role": default_role, "content": x}]
    return check_messages(x)


def chat_record(rec: dict) -> list[dict]:
    """A chat record's messages (one of the three formats)."""
    if "messages" in rec:
        msgs = check_messages(rec["messages"])
    elif "prompt" in rec and "completion" in rec:
        msgs = _as_messages(rec["prompt"], "user") + _as_messages(rec["completion"], "assistant")
    elif "instruction" in rec and "output" in rec:
        if not isinstance(rec["instruction"], str) or not isinstance(rec["output"], str):
            raise ValueError("instruction and output must be strings")
        inp = rec.get("input") or ""
        if not isinstance(inp, str):
            raise ValueError("input must be a string")
        user = rec["instruction"] + ("\n\n" + inp if inp else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
    else:
        raise ValueError("expected 'messages', 'prompt' + 'completion', or 'instruction' + 'output'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("no assistant message: nothing to train")
    return msgs


def _reply(x) -> str:
    if isinstance(x, str):
        return x
    msgs = check_messages(x)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise ValueError("chosen/rejected must be a string or a list of one assistant message")
    return msgs[0]["content"]


def preference_record(rec: dict) -> dict:
    """{"prompt": messages, "chosen": str, "rejected": str} of a DPO record."""
    for k in ("prompt", "chosen", "rejected"):
        if k not in rec:
            raise ValueError(f"missing {k!r} (a preference line needs prompt, chosen, rejected)")
    return {"prompt": _as_messages(rec["prompt"], "user"), "chosen": _reply(rec["chosen"]),
            "rejected": _reply(rec["rejected"])}


def prompt_record(rec: dict) -> dict:
    """A prompt for sampling: the record with "prompt" as messages (other keys kept)."""
    if "prompt" not in rec:
        raise ValueError("missing 'prompt'")
    msgs = _as_messages(rec["prompt"], "user")
    if msgs[-1]["role"] == "assistant":
        raise ValueError("the prompt ends with an assistant message: nothing to answer")
    return dict(rec, prompt=msgs)


# ---- fitting sequences into the context ----------------------------------------------------
class Fit:
    """Cut (or drop) rendered sequences to at most ``max_len`` tokens, counting what happened."""

    def __init__(self, max_len: int, overflow: str):
        if overflow not in ("truncate", "drop"):
            raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
        self.max_len, self.overflow = max_len, overflow
        self.truncated = self.dropped = self.untrained = 0

    def __call__(self, ids, mask):
        """(ids, mask) cut to max_len, or None (dropped: too long, or nothing left to train)."""
        if len(ids) > self.max_len:
            if self.overflow == "drop":
                self.dropped += 1
                return None
            ids, mask = ids[:self.max_len], mask[:self.max_len]
            self.truncated += 1
        if not any(mask[1:]):  # position 0 is never a target
            self.untrained += 1
            return None
        return ids, mask

    def summary(self, what: str) -> str:
        s = f"{self.truncated} {what} truncated to {self.max_len} tokens, {self.dropped} dropped as too long"
        return s + (f", {self.untrained} dropped with no trained token left" if self.untrained else "")


# ---- SFT rows and batches ---------------------------------------------------------------------
def pack(seqs: list, row_len: int, pad_id: int, packing: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sequences (ids, mask), each at most ``row_len`` long, into rows (R, row_len) of ids and
    of masks. Packing: in order, a sequence that does not fit in the current row starts the
    next; padding: one sequence per row. Pads have mask 0."""
    rows_i, rows_m, cur_i, cur_m = [], [], [], []
    for ids, mask in seqs:
        if cur_i and (not packing or len(cur_i) + len(ids) > row_len):
            rows_i.append(cur_i)
            rows_m.append(cur_m)
            cur_i, cur_m = [], []
        cur_i = cur_i + list(ids)
        cur_m = cur_m + list(mask)
    if cur_i:
        rows_i.append(cur_i)
        rows_m.append(cur_m)
    R = len(rows_i)
    I = np.full((R, row_len), pad_id, dtype=np.int64)
    M = np.zeros((R, row_len), dtype=np.int8)
    for r, (a, b) in enumerate(zip(rows_i, rows_m)):
        I[r, :len(a)] = a
        M[r, :len(b)] = b
    return I, M


def padded_batch(seqs: list, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences (ids, mask) -> x, y (R, L - 1), padded with ``pad_id`` to the longest (L):
    x the inputs, y the next token where the mask trains it and IGNORE elsewhere (pads too).
    DPO's pair batches and GRPO's answer batches are both this."""
    L = max(len(ids) for ids, _ in seqs)
    ids = np.full((len(seqs), L), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), L), dtype=bool)
    for i, (a, m) in enumerate(seqs):
        ids[i, :len(a)] = a
        mask[i, :len(m)] = np.asarray(m, dtype=bool)
    return ids[:, :-1], np.where(mask[:, 1:], ids[:, 1:], IGNORE)


class EpochOrder:
    """Items drawn in a fresh seeded permutation each epoch, ``batch`` at a time, with the
    state a checkpoint needs: the generator's state at the start of the epoch plus the
    position in it, so a resumed run draws the same batches. The base of the SFT, DPO and
    GRPO data sources."""

    def _init_order(self, n: int, batch: int, seed: int) -> None:
        self.n, self.B = n, batch
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self._start_epoch()

    def _start_epoch(self):
        self.epoch_state = self.rng.bit_generator.state
        self.order = self.rng.permutation(self.n)
        self.pos = 0

    def _take(self) -> list[int]:
        """The next ``batch`` indices, starting a new epoch when this one runs out."""
        take = []
        while len(take) < self.B:
            if self.pos >= len(self.order):
                self.epoch += 1
                self._start_epoch()
            take.append(int(self.order[self.pos]))
            self.pos += 1
        return take

    def state(self) -> dict:
        return {"epoch_rng": self.epoch_state, "pos": self.pos, "epoch": self.epoch}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["epoch_rng"]
        self._start_epoch()
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])


class SFTRows(EpochOrder):
    """Batches (x, y) (B, T) of packed or padded rows for the Trainer: y is the next token
    where it is trained, IGNORE elsewhere. Rows are shuffled each epoch by a seeded Generator;
    ``state()`` is the generator's state at the start of the epoch plus the position in it,
    so a resumed run draws the same batches."""

    def __init__(self, seqs: list, block_size: int, batch_size: int, seed: int, pad_id: int, packing: bool = True):
        if not seqs:
            raise ValueError("no training conversations left (all bad, too long or without an assistant turn)")
        self.ids, self.mask = pack(seqs, block_size + 1, pad_id, packing)
        self.T, self.packing = block_size, packing
        self.tokens_per_batch = batch_size * block_size
        self._init_order(len(self.ids), batch_size, seed)

    def __len__(self):
        return len(self.ids)

    def next(self):
        take = self._take()
        ids, mask = self.ids[take], self.mask[take]
        if not self.packing:  # padded rows: cut the batch to its longest row
            n = int(np.max(np.where(mask.any(axis=0))[0])) + 1 if mask.any() else 2
            ids, mask = ids[:, :max(n, 2)], mask[:, :max(n, 2)]
        x = ids[:, :-1]
        y = np.where(mask[:, 1:] > 0, ids[:, 1:], IGNORE)
        return np.ascontiguousarray(x), np.ascontiguousarray(y)


def fixed_sft_batches(seqs: list, block_size: int, batch_size: int, pad_id: int, packing: bool) -> list:
    """Validation batches: every sequence once, in order."""
    if not seqs:
        return []
    I, M = pack(seqs, block_size + 1, pad_id, packing)
    out = []
    for s in range(0, len(I), batch_size):
        ids, mask = I[s:s + batch_size], M[s:s + batch_size]
        out.append((ids[:, :-1], np.where(mask[:, 1:] > 0, ids[:, 1:], IGNORE)))
    return out
