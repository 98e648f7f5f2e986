"""The chat format: special tokens, and a conversation rendered to ids and a loss mask at once.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``
(OpenAI's and Hugging Face's chat format). It renders as

    <|endoftext|> <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ...

and the mask is decided where each token is emitted (nanochat's ``render_conversation``): an
assistant message's content and its ``<|end|>`` are trained (mask 1); the leading
``<|endoftext|>``, role tokens, system and user content are not (mask 0). Nothing searches the
ids for a template afterwards, so the mask cannot drift out of step with the tokenizer. Content
is encoded with ``allowed_special="none"``: a user who types "<|end|>" gets the characters, not
the token.

``mask[i]`` says whether token ``i`` is a training *target*: the model is trained to predict
``ids[i]`` from ``ids[:i]`` exactly where ``mask[i] == 1`` (``targets`` does the shift).

Adding the tokens to a pretrained model's tokenizer grows the vocabulary; ``grow_vocab`` grows
the model's embedding (and an untied head) to match: old rows unchanged, new rows drawn from a
Gaussian with the mean and per-channel spread of the old rows (Hewitt 2021, "Initializing new
word embeddings for pretrained language models"), so a new token's logit starts among the
ordinary ones and the four new tokens are told apart from the first step.

Leaves out: tool calls, images, multiple assistant turns rendered as one, a generation prompt
for roles other than the assistant.
"""
from __future__ import annotations

import numpy as np

from tinylm.nn import Module, Parameter

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ROLES = ("system", "user", "assistant")
IGNORE = -100


def check_messages(messages) -> list[dict]:
    """The messages as a list of {"role", "content"} dicts; a ValueError says what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message must come first")
        out.append({"role": role, "content": content})
    return out


class ChatFormat:
    """The template over one tokenizer. Creating it adds the four special tokens to the
    tokenizer if they are missing (ids after the current vocabulary)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        ids = tokenizer.add_special_tokens([SYSTEM, USER, ASSISTANT, END])
        self.role_id = dict(zip(ROLES, ids[:3]))
        self.end_id = ids[3]
        self.bos_id = tokenizer.eot_id  # None for a tokenizer without <|endoftext|>: no BOS

    def _text(self, s: str) -> list[int]:
        return self.tok.encode(s, allowed_special="none") if s else []

    def render(self, messages, train_roles=("assistant",)) -> tuple[list[int], list[int]]:
        """(ids, mask) of a whole conversation; content and <|end|> of ``train_roles`` messages
        are trained."""
        messages = check_messages(messages)
        ids: list[int] = []
        mask: list[int] = []

        def emit(toks, trained):
            ids.extend(toks)
            mask.extend([int(trained)] * len(toks))

        if self.bos_id is not None:
            emit([self.bos_id], False)
        for m in messages:
            trained = m["role"] in train_roles
            emit([self.role_id[m["role"]]], False)  # the template decides the role: not trained
            emit(self._text(m["content"]), trained)
            emit([self.end_id], trained)  # trained: the model must learn to stop
        return ids, mask

    def render_prompt(self, messages) -> list[int]:
        """Ids that ask for the next assistant message: the conversation, then <|assistant|>."""
        ids, _ = self.render(messages) if messages else ([] if self.bos_id is None else [self.bos_id], [])
        return ids + [self.role_id["assistant"]]

    def render_reply(self, prompt_messages, reply: str) -> tuple[list[int], list[int]]:
        """(ids, mask) of a prompt conversation followed by one assistant reply: only the reply
        (its content and <|end|>) is trained (DPO's chosen and rejected sequences)."""
        ids, mask = self.render(prompt_messages, train_roles=())
        ids = ids + [self.role_id["assistant"]]
        mask = mask + [0]
        r = self._text(reply) + [self.end_id]
        return ids + r, mask + [1] * len(r)

    def show(self, ids, mask) -> str:
        """The rendering as text with trained spans in {{ }}: what a reviewer checks."""
        out, inside = [], False
        for t, m in zip(ids, mask):
            if m and not inside:
                out.append("{{")
            if not m and inside:
                out.append("}}")
            inside = bool(m)
            out.append(self.tok.decode([t]))
        if inside:
            out.append("}}")
        return "".join(out)


def targets(ids, mask) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets of one rendered sequence: x = ids[:-1], y = ids[1:] with
    untrained targets set to IGNORE."""
    ids = np.asarray(ids, dtype=np.int64)
    m = np.asarray(mask, dtype=bool)
    y = np.where(m[1:], ids[1:], IGNORE)
    return ids[:-1], y


# ---- growing a model's vocabulary -----------------------------------------------------------
def _replace_param(model: Module, old: Parameter, new: Parameter) -> int:
    """Point every attribute that holds ``old`` (a tied one in two places) at ``new``."""
    n = 0
    for m in model.modules():
        for k, v in list(vars(m).items()):
            if v is old:
                setattr(m, k, new)
                n += 1
    return n


def _vocab_params(model) -> list:
    """(name, parameter, axis) of every parameter indexed by token id: token embeddings (an
    nn.Embedding other than a position table) and an untied ``lm_head``. Found by role, not by
    shape: a (4C, C) projection can have as many rows as the vocabulary."""
    from tinylm.nn import Embedding  # noqa: PLC0415

    names = {id(p): n for n, p in model.named_parameters()}
    out, seen = [], set()
    for m in model.modules():
        for attr, v in vars(m).items():
            w = getattr(v, "weight", None)
            if w is None or id(w) in seen or id(w) not in names:
                continue
            if isinstance(v, Embedding) and attr not in ("wpe", "pos_emb", "position_embeddings"):
                out.append((names[id(w)], w, 0))
                seen.add(id(w))
            elif attr == "lm_head":
                out.append((names[id(w)], w, 1 if getattr(v, "layout", "in_out") == "in_out" else 0))
                seen.add(id(w))
    return out


def grow_vocab(model, new_size: int, seed: int = 0) -> list[str]:
    """Grow the token embedding (and an untied head) to ``new_size`` tokens: old rows kept bit
    for bit, new rows ~ N(mean, std) of the old rows per channel. Returns the names of the
    grown parameters. Must run before a ParamStore is made."""
    old = model.config.vocab_size
    if new_size < old:
        raise ValueError(f"grow_vocab: the model has {old} tokens; cannot shrink to {new_size}")
    if new_size == old:
        return []
    rng = np.random.default_rng(seed)
    grown = []
    for name, p, axis in _vocab_params(model):
        w = p.numpy()
        if w.shape[axis] != old:
            continue
        wr = w if axis == 0 else w.T
        mu, sd = wr.mean(axis=0), wr.std(axis=0)
        extra = (mu + sd * rng.standard_normal((new_size - old, wr.shape[1]))).astype(w.dtype)
        full = np.concatenate([wr, extra])
        new = Parameter(full if axis == 0 else np.ascontiguousarray(full.T), dtype=w.dtype)
        new.requires_grad = p.requires_grad
        _replace_param(model, p, new)
        grown.append(name)
    if not grown:
        raise ValueError(f"grow_vocab: no token embedding found in {type(model).__name__}")
    model.config.vocab_size = new_size
    return grown
