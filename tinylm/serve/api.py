"""OpenAI's request and response shapes, checked and built without any HTTP.

``parse_request(kind, body, ctx)`` turns a decoded JSON body of ``/v1/completions``
(kind "completion") or ``/v1/chat/completions`` (kind "chat") into a ``Plan``: one engine job
per choice (prompt ids + ``engine.Params``), or raises ``APIError`` with the status and the
OpenAI error body (``{"error": {"message", "type", "param", "code"}}``). The response and
stream-chunk builders below give the JSON OpenAI's clients parse.

Checked like OpenAI does: an unknown field is a 400 ("Unrecognized request argument"), each
known field's type and range (a bool is not a number), ``n`` against the server's slots, every
token id against the vocabulary, a prompt that leaves no room in the context. ``max_tokens``
must be 1..block_size; when prompt + max_tokens would pass the context it is cut to what fits
and the choice ends with ``finish_reason: "length"``. Known fields this server does not
implement (logprobs, penalties, logit_bias, echo, best_of, suffix) are accepted only at their
neutral values. ``top_k`` is an extension (send it with the client's ``extra_body``).

The chat template is chosen in one place, ``chat_template``: the post-training chat format's
special tokens when the checkpoint's tokenizer has them, else plain text ("User: ...\\n
Assistant:") stopping at end-of-text or "\\nUser:".

Leaves out: logprobs, tools and function calls, response_format, images and audio, the
legacy ``best_of`` search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from tinylm.generate import prompt_ids as _text_prompt_ids
from tinylm.serve.engine import Params


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


# ---- the chat template: the one switch ------------------------------------------------------
@dataclass
class ChatTemplate:
    name: str                                   # "chat-tokens" or "plain"
    render: Callable[[list], list[int]]         # messages -> prompt ids ending where the reply starts
    stop_tokens: frozenset
    stop: tuple[str, ...] = ()


def chat_template(tokenizer, vocab_size: int) -> ChatTemplate:
    """The post-training chat format (tinylm.posttrain.chat) if it is importable and this
    tokenizer already has its special tokens (and the model has rows for them); else plain
    text: ``System: ...\\nUser: ...\\nAssistant: ...\\nUser: ...\\nAssistant:``."""
    eot = frozenset() if tokenizer.eot_id is None else frozenset({tokenizer.eot_id})
    try:
        from tinylm.posttrain import chat  # noqa: PLC0415
        names = (chat.SYSTEM, chat.USER, chat.ASSISTANT, chat.END)
        fmt_cls = chat.ChatFormat
    except (ImportError, AttributeError):
        names = None
    if names and all(s in tokenizer.special_tokens for s in names) and tokenizer.vocab_size <= vocab_size:
        fmt = fmt_cls(tokenizer)  # adds nothing: every token is there
        return ChatTemplate("chat-tokens", fmt.render_prompt, eot | {fmt.end_id})
    return ChatTemplate("plain", lambda messages: _plain_prompt(tokenizer, messages), eot, ("\nUser:",))


_PLAIN_ROLE = {"system": "System", "user": "User", "assistant": "Assistant"}


def _plain_prompt(tokenizer, messages) -> list[int]:
    text = "".join(f"{_PLAIN_ROLE[m['role']]}: {m['content']}\n" for m in messages) + "Assistant:"
    ids = tokenizer.encode(text, allowed_special="none")  # typed "<|endoftext|>" stays text
    return ([tokenizer.eot_id] if tokenizer.eot_id is not None else []) + ids


# ---- what a request needs to know about the server ------------------------------------------
@dataclass
class Context:
    model_name: str
    tokenizer: object
    block_size: int
    vocab_size: int
    max_n: int                  # choices per request at most (the engine's slots)
    template: ChatTemplate


@dataclass
class Plan:
    kind: str                   # "completion" or "chat"
    model: str
    stream: bool
    include_usage: bool
    prompt_tokens: int          # each prompt counted once, whatever n is
    jobs: list = field(default_factory=list)  # (choice index, prompt ids, Params)


# ---- field checks ---------------------------------------------------------------------------
def _bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _int(body, name, lo=None, hi=None, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"{name} must be an integer, got {_show(v)}", "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        want = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise _bad(name, f"{name} must be {want}, got {v}", "invalid_value")
    return v


def _num(body, name, lo, hi, default, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, f"{name} must be a number, got {_show(v)}", "invalid_type")
    if v > hi or v < lo or (lo_open and v == lo):
        raise _bad(name, f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", "invalid_value")
    return float(v)


def _bool(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"{name} must be a boolean, got {_show(v)}", "invalid_type")
    return v


def _show(v) -> str:
    s = repr(v)
    return f"{type(v).__name__} {s if len(s) <= 40 else s[:37] + '...'}"


def _neutral(body, name, ok) -> None:
    """A known OpenAI field this server does not implement: only its neutral value passes."""
    if name in body and not ok(body[name]):
        raise _bad(name, f"{name}={_show(body[name])} is not supported by this server", "unsupported_value")


_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed",
           "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
_FIELDS = {"completion": _COMMON | {"prompt", "echo", "best_of", "suffix"},
           "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}}


def parse_request(kind: str, body, ctx: Context) -> Plan:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _FIELDS[kind])
    if unknown:
        raise _bad(unknown[0], f"Unrecognized request argument supplied: {', '.join(unknown)}", "unknown_parameter")
    model = body.get("model")
    if "model" not in body:
        raise _bad("model", "you must provide a model parameter", "missing_required_parameter")
    if not isinstance(model, str):
        raise _bad("model", "model must be a string (GET /v1/models lists it)", "invalid_type")
    if model != ctx.model_name:
        raise APIError(404, f"The model {model!r} does not exist; this server has {ctx.model_name!r}",
                       param="model", code="model_not_found")
    zero = lambda v: v is None or (not isinstance(v, bool) and isinstance(v, (int, float)) and v == 0)  # noqa: E731
    for name in ("presence_penalty", "frequency_penalty"):
        _neutral(body, name, zero)
    _neutral(body, "logit_bias", lambda v: v is None or v == {})
    _neutral(body, "logprobs", lambda v: v is None or v is False or (kind == "completion" and zero(v)))
    _neutral(body, "top_logprobs", zero)
    _neutral(body, "echo", lambda v: v is None or v is False)
    _neutral(body, "best_of", lambda v: v is None or (v == 1 and not isinstance(v, bool)))
    _neutral(body, "suffix", lambda v: v is None or v == "")
    if "user" in body and not isinstance(body["user"], (str, type(None))):
        raise _bad("user", f"user must be a string, got {_show(body['user'])}", "invalid_type")

    n = _int(body, "n", 1, ctx.max_n, 1)
    temperature = _num(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _num(body, "top_p", 0.0, 1.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", 1, None, None)
    seed = _int(body, "seed", None, None, None)
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or set(opts) - {"include_usage"}):
        raise _bad("stream_options", 'stream_options must be an object like {"include_usage": true}', "invalid_type")
    if opts is not None and not stream:
        raise _bad("stream_options", "stream_options is only allowed when stream is true", "invalid_value")
    include_usage = _bool(opts or {}, "include_usage")
    stop = _stops(body.get("stop"))
    newer = kind == "chat" and body.get("max_completion_tokens") is not None  # chat's newer name for it
    max_tokens = _int(body, "max_completion_tokens" if newer else "max_tokens", 1, ctx.block_size, None)

    if kind == "completion":
        prompts = _prompts(body, ctx)
        stop_tokens = frozenset() if ctx.tokenizer.eot_id is None else frozenset({ctx.tokenizer.eot_id})
        if max_tokens is None:
            max_tokens = 16  # OpenAI's default for completions
    else:
        prompts = [_chat_prompt(body, ctx)]
        stop_tokens = ctx.template.stop_tokens
        stop = tuple(dict.fromkeys(stop + ctx.template.stop))
    plan = Plan(kind, model, stream, include_usage, sum(len(p) for p in prompts))
    for i, ids in enumerate(prompts):
        room = ctx.block_size - len(ids)
        if room < 1:
            raise _bad("messages" if kind == "chat" else "prompt",
                       f"This model's maximum context length is {ctx.block_size} tokens; the prompt has {len(ids)}, "
                       f"which leaves no room to generate", "context_length_exceeded")
        want = room if max_tokens is None else min(max_tokens, room)
        for j in range(n):
            s = None if seed is None else seed + i * n + j  # choice k uses seed + k
            params = Params(max_tokens=want, temperature=temperature, top_k=top_k,
                            top_p=None if top_p >= 1.0 else top_p, seed=s, stop=stop, stop_tokens=stop_tokens)
            plan.jobs.append((i * n + j, ids, params))
    if len(plan.jobs) > ctx.max_n:
        raise _bad("n", f"{len(prompts)} prompts x n={n} is {len(plan.jobs)} choices; this server takes at most "
                   f"{ctx.max_n} per request", "invalid_value")
    return plan


def _stops(v) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v) or len(v) > 4:
        raise _bad("stop", "stop must be a non-empty string or a list of at most 4 of them", "invalid_type")
    return tuple(v)


def _prompts(body, ctx: Context) -> list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of lists of ids."""
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("prompt", "you must provide a prompt", "missing_required_parameter")
    p = body["prompt"]
    tok = ctx.tokenizer
    if isinstance(p, str):
        return [_text_prompt_ids(tok, p)]
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return [_check_ids(p, ctx)]
    if isinstance(p, list) and p and all(isinstance(s, str) for s in p):
        return [_text_prompt_ids(tok, s) for s in p]
    if isinstance(p, list) and p and all(isinstance(q, list) for q in p):
        out = []
        for q in p:
            if not q or not all(isinstance(t, int) and not isinstance(t, bool) for t in q):
                raise _bad("prompt", "each prompt of token ids must be a non-empty list of integers", "invalid_type")
            out.append(_check_ids(q, ctx))
        return out
    raise _bad("prompt", "prompt must be a string, a list of strings, a non-empty list of token ids or a list of them",
               "invalid_type")


def _check_ids(ids, ctx: Context) -> list[int]:
    bad = [t for t in ids if not 0 <= t < ctx.vocab_size]
    if bad:
        raise _bad("prompt", f"token id {bad[0]} is out of range [0, {ctx.vocab_size})", "invalid_value")
    return list(ids)


def _chat_prompt(body, ctx: Context) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "messages must be a non-empty list of {role, content} objects",
                   "missing_required_parameter" if msgs is None else "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object, got {_show(m)}", "invalid_type")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in _PLAIN_ROLE:
            raise _bad(f"messages[{i}].role", f"messages[{i}].role must be system, developer, user or assistant, "
                       f"got {_show(m.get('role'))}", "invalid_value")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise _bad(f"messages[{i}]", f"messages[{i}]: unsupported fields {sorted(extra)}", "unknown_parameter")
        out.append({"role": role, "content": _content(m.get("content"), i)})
    try:
        return list(ctx.template.render(out))
    except ValueError as e:  # the chat format's own rules (e.g. where a system message may stand)
        raise _bad("messages", str(e), "invalid_value") from None


def _content(c, i: int) -> str:
    """A string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts "
               f"(this server takes no images or audio), got {_show(c)}", "invalid_type")


# ---- responses ------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(plan: Plan, rid: str, created: int, texts: list[str], reasons: list[str], n_tokens: int) -> dict:
    if plan.kind == "completion":
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "text_completion"
    else:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "chat.completion"
    return {"id": rid, "object": obj, "created": created, "model": plan.model, "choices": choices,
            "usage": usage(plan.prompt_tokens, n_tokens)}


def chunk(plan: Plan, rid: str, created: int, index: int | None, text: str | None = None,
          finish_reason: str | None = None, role: bool = False, usage_: dict | None = None) -> dict:
    """One streamed chunk: a piece of text, a choice's end, a chat choice's opening role, or
    (index None) the closing usage chunk."""
    if index is None:
        choices = []
    elif plan.kind == "completion":
        choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    else:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": rid, "object": "text_completion" if plan.kind == "completion" else "chat.completion.chunk",
           "created": created, "model": plan.model, "choices": choices}
    if plan.include_usage:
        out["usage"] = usage_
    return out
