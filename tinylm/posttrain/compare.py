"""People in the loop: ``tinylm chat`` (talk to a model) and ``tinylm compare`` (judge two).

``chat_loop``: a multi-turn terminal chat. Each reply is streamed as its tokens arrive and
stops at <|end|>; ``/reset`` forgets the conversation, ``/quit`` (or end of input) leaves. When
the conversation outgrows the context the oldest turns are dropped (a system message is kept).

``compare``: for each prompt, answers from model A and model B side by side, in an order drawn
at random per prompt (so a position bias does not become a model bias); the person types 1 or
2 (the better), t (tie), s (skip) or q (quit). Each pick is appended at once as one DPO line,
{"prompt", "chosen", "rejected"} plus which model gave which, written, flushed and fsync'd
before the next prompt is shown: a crash, Ctrl-C or closed input loses nothing already picked.
Prompts already in the output file are not asked again, so a session continues where it
stopped. Ties and skips are counted, not written (DPO needs a preference).

Both take ``input_fn``/``out`` so tests can script a person.
"""
from __future__ import annotations

import codecs
import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np

from tinylm.generate import check_sampling, generate_iter


def stream_reply(model, chat, messages, max_new_tokens: int, **sampling):
    """Yield text pieces of the assistant's next message; stops at <|end|>."""
    ids = chat.render_prompt(messages)
    room = model.config.block_size - len(ids)
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for nxt in generate_iter(model, [ids], max(1, min(max_new_tokens, room)), stop_tokens=[chat.end_id], **sampling):
        t = int(nxt[0])
        if t == chat.end_id:
            break
        piece = dec.decode(chat.tok.decode_bytes([t]))
        if piece:
            yield piece
    tail = dec.decode(b"", final=True)
    if tail:
        yield tail


def reply(model, chat, messages, max_new_tokens: int, **sampling) -> str:
    return "".join(stream_reply(model, chat, messages, max_new_tokens, **sampling))


def _fit(chat, messages, block_size: int, reserve: int) -> list:
    """Drop the oldest turns (keeping a system message) until the prompt leaves ``reserve``
    tokens of room."""
    msgs = list(messages)
    while len(msgs) > 1 and len(chat.render_prompt(msgs)) > block_size - reserve:
        k = 1 if msgs[0]["role"] == "system" else 0
        if len(msgs) <= k + 1:
            break
        del msgs[k]
    return msgs


def _load(ckpt):
    from tinylm.posttrain.chat import ChatFormat  # noqa: PLC0415
    from tinylm.posttrain.stage import load_policy  # noqa: PLC0415

    model, tok = load_policy(ckpt)
    chat = ChatFormat(tok)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{ckpt}: this model has no chat tokens; fine-tune it with `tinylm sft` first")
    return model, chat


def chat_loop(ckpt, system: str | None = None, max_new_tokens: int = 200, temperature: float = 0.8,
              top_k=None, top_p=None, seed=None, input_fn=input, out=None) -> int:
    import sys  # noqa: PLC0415

    out = out or sys.stdout
    check_sampling(temperature, top_k, top_p)
    model, chat = _load(ckpt)
    start = [{"role": "system", "content": system}] if system else []
    msgs = list(start)
    out.write("chat: /reset starts over, /quit leaves\n")
    turn = 0
    while True:
        try:
            line = input_fn("you> ")
        except EOFError:
            out.write("\n")
            return 0
        cmd = line.strip()
        if cmd == "/quit":
            return 0
        if cmd == "/reset":
            msgs = list(start)
            out.write("(conversation reset)\n")
            continue
        if not cmd:
            continue
        msgs.append({"role": "user", "content": line})
        msgs = _fit(chat, msgs, model.config.block_size, min(max_new_tokens, model.config.block_size // 2))
        out.write("model> ")
        pieces = []
        s = None if seed is None else seed + turn
        for piece in stream_reply(model, chat, msgs, max_new_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, seed=s):
            out.write(piece)
            out.flush()
            pieces.append(piece)
        out.write("\n")
        msgs.append({"role": "assistant", "content": "".join(pieces)})
        turn += 1


def read_prompts(path) -> list:
    """JSONL {"prompt": str | messages} lines, or plain text with one prompt per line."""
    from tinylm.posttrain.data import Problems, prompt_record, read_jsonl  # noqa: PLC0415

    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    first = next((x for x in text.splitlines() if x.strip()), "")
    if first.lstrip().startswith("{"):
        probs = Problems()
        recs = read_jsonl([path], prompt_record, probs)
        probs.report()
        return [r["prompt"] for r in recs]
    return [[{"role": "user", "content": x}] for x in text.splitlines() if x.strip()]


def _side_by_side(a: str, b: str, width: int) -> str:
    col = max(20, (width - 3) // 2)
    la = [w for para in a.split("\n") for w in (textwrap.wrap(para, col) or [""])]
    lb = [w for para in b.split("\n") for w in (textwrap.wrap(para, col) or [""])]
    n = max(len(la), len(lb))
    la, lb = la + [""] * (n - len(la)), lb + [""] * (n - len(lb))
    head = f"{'[1]':<{col}} | [2]"
    return "\n".join([head, "-" * col + "-+-" + "-" * col] + [f"{x:<{col}} | {y}" for x, y in zip(la, lb)])


def _append(path: Path, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def compare(ckpt_a, ckpt_b, prompts_path, out_path, max_new_tokens: int = 200, temperature: float = 0.8,
            top_k=None, top_p=None, seed=None, input_fn=input, out=None) -> int:
    """Returns how many preferences were appended."""
    import sys  # noqa: PLC0415

    out = out or sys.stdout
    check_sampling(temperature, top_k, top_p)
    prompts = read_prompts(prompts_path)
    out_path = Path(out_path)
    done = set()
    if out_path.is_file():
        for line in out_path.read_text(encoding="utf-8").splitlines():
            try:
                done.add(json.dumps(json.loads(line)["prompt"]))
            except (ValueError, KeyError, TypeError):
                continue
    todo = [p for p in prompts if json.dumps(p) not in done]
    if len(todo) < len(prompts):
        out.write(f"{len(prompts) - len(todo)} prompts already judged in {out_path}; {len(todo)} to go\n")
    (ma, ca), (mb, cb) = _load(ckpt_a), _load(ckpt_b)
    rng = np.random.default_rng(seed)
    width = shutil.get_terminal_size((100, 20)).columns
    n_pref = ties = skips = 0
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    for k, msgs in enumerate(todo):
        s = None if seed is None else seed + k
        ans = {"A": reply(ma, ca, msgs, max_new_tokens, seed=s, **sampling),
               "B": reply(mb, cb, msgs, max_new_tokens, seed=s, **sampling)}
        order = ["A", "B"] if rng.random() < 0.5 else ["B", "A"]
        out.write(f"\n=== prompt {k + 1}/{len(todo)} ===\n")
        for m in msgs:
            out.write(f"{m['role']}: {m['content']}\n")
        out.write(_side_by_side(ans[order[0]], ans[order[1]], width) + "\n")
        while True:
            try:
                pick = input_fn("better? 1 / 2 / t(ie) / s(kip) / q(uit): ").strip().lower()
            except (EOFError, KeyboardInterrupt):
                out.write(f"\nstopped: {n_pref} preferences appended, {ties} ties, {skips} skipped\n")
                return n_pref
            if pick in ("1", "2", "t", "s", "q"):
                break
            out.write("type 1, 2, t, s or q\n")
        if pick == "q":
            break
        if pick == "t":
            ties += 1
            continue
        if pick == "s":
            skips += 1
            continue
        win, lose = (order[0], order[1]) if pick == "1" else (order[1], order[0])
        path = {"A": str(ckpt_a), "B": str(ckpt_b)}
        _append(out_path, {"prompt": msgs, "chosen": [{"role": "assistant", "content": ans[win]}],
                           "rejected": [{"role": "assistant", "content": ans[lose]}],
                           "chosen_model": path[win], "rejected_model": path[lose]})
        n_pref += 1
    out.write(f"done: {n_pref} preferences appended, {ties} ties, {skips} skipped\n")
    return n_pref
