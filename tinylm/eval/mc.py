"""Multiple choice: which continuation of a context does the model find most likely?

A task is JSONL, one example a line: ``{"context": str, "choices": [str, ...], "label": int}``
(optionally ``"fewshot": str``, a prefix put before the context). Each choice is appended to
the context exactly as written (put a leading space or newline in the choice if the text needs
one) and scored by the summed log-probability of its tokens given the context. Reported
together, each the share of examples whose best-scoring choice is the labelled one:

- ``acc``: by the summed log-likelihood;
- ``acc_norm``: by log-likelihood / characters of the choice (lm-eval's acc_norm);
- ``acc_bytes``: by log-likelihood / UTF-8 bytes of the choice;
- ``acc_token_mean``: by the mean log-likelihood per token of the choice;

each with a bootstrap standard error over examples. ``num_fewshot=k`` puts k other solved
examples of the same file (drawn per example from a seeded generator) before each context,
``context + right choice`` each, separated by blank lines.

Tokenization follows lm-eval: trailing whitespace of the context moves to the start of the
continuation; the pair is encoded whole and the continuation's tokens are those after the
context's (so a merge across the boundary is not split apart); an empty context is the
end-of-text token. A context too long for the model keeps its last tokens.

The built-in task ``nextline`` (tinylm/eval/data/nextline.jsonl, made by ``make_nextline``
from the held-out files of the built-in corpus): the context is the start of a Python function,
up to 12 lines; the choices are the function's real next line and three lines drawn from
other files, re-indented to the real line's indentation, so only their content tells them apart.
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from tinylm.eval.common import bootstrap_stderr, read_jsonl, sequence_logprobs, sha256_text

METRICS = ("acc", "acc_norm", "acc_bytes", "acc_token_mean")
DATA = Path(__file__).parent / "data"
BUILTIN = {"nextline": DATA / "nextline.jsonl"}


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval makes them."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    if not context:
        return [tok.eot_id if tok.eot_id is not None else 0], tok.encode(continuation, allowed_special="none")
    whole = tok.encode(context + continuation, allowed_special="none")
    ctx = tok.encode(context, allowed_special="none")
    return ctx, whole[len(ctx):]


def loglikelihoods(model, tok, requests: list[tuple[str, str]], batch_size: int = 8) -> list[tuple[float, int, bool]]:
    """[(context, continuation)] -> [(sum of log p of the continuation's tokens, its tokens,
    whether each of them is the greedy choice)], left-truncating contexts to the model's window."""
    bs = model.config.block_size
    seqs, froms = [], []
    for i, (c, x) in enumerate(requests):
        ctx, cont = encode_pair(tok, c, x)
        if not cont:
            raise ValueError(f"request {i}: the continuation {x!r} has no tokens")
        if len(cont) > bs:
            raise ValueError(f"request {i}: the continuation has {len(cont)} tokens, more than the context {bs}")
        seq = (ctx + cont)[-(bs + 1):]
        seqs.append(seq)
        froms.append(len(seq) - len(cont))
    out = sequence_logprobs(model, seqs, froms, batch_size, greedy=True)
    return [(float(lp.sum()), len(lp), g) for lp, g in out]


def check_examples(examples: list[dict], where: str = "task") -> None:
    for n, ex in enumerate(examples, 1):
        ch = ex.get("choices")
        if not isinstance(ex.get("context"), str) or not isinstance(ch, list) or len(ch) < 2 or \
                not all(isinstance(c, str) and c for c in ch):
            raise ValueError(f"{where}, example {n}: need a string 'context' and 'choices', a list of >= 2 non-empty strings")
        lab = ex.get("label")
        if not isinstance(lab, int) or isinstance(lab, bool) or not 0 <= lab < len(ch):
            raise ValueError(f"{where}, example {n}: 'label' must be an index into choices, got {lab!r}")


def _prefixes(examples: list[dict], num_fewshot: int, seed: int) -> list[str]:
    if num_fewshot < 0 or (num_fewshot and num_fewshot >= len(examples)):
        raise ValueError(f"num_fewshot={num_fewshot}: need 0 <= k < examples ({len(examples)})")
    out = []
    for i, ex in enumerate(examples):
        pre = ex.get("fewshot", "") or ""
        if num_fewshot:
            rng = np.random.default_rng([seed, i])
            others = [j for j in rng.permutation(len(examples)).tolist() if j != i][:num_fewshot]
            pre += "".join(examples[j]["context"] + examples[j]["choices"][examples[j]["label"]] + "\n\n"
                           for j in others)
        out.append(pre)
    return out


def mc_eval(model, tok, examples: list[dict], num_fewshot: int = 0, seed: int = 1234, batch_size: int = 8,
            n_boot: int = 1000) -> dict:
    """Score every choice of every example -> {"metrics": {name: {"value", "stderr"}}, "n",
    "examples": per-example rows (each choice's log-likelihood, tokens, characters, bytes)}."""
    check_examples(examples)
    pre = _prefixes(examples, num_fewshot, seed)
    reqs, where = [], []
    for i, ex in enumerate(examples):
        for j, c in enumerate(ex["choices"]):
            reqs.append((pre[i] + ex["context"], c))
            where.append((i, j))
    lls = loglikelihoods(model, tok, reqs, batch_size)
    rows = [{"index": i, "label": ex["label"], "choices": []} for i, ex in enumerate(examples)]
    for (i, j), (ll, nt, g) in zip(where, lls):
        c = examples[i]["choices"][j]
        rows[i]["choices"].append({"text": c, "loglikelihood": ll, "tokens": nt, "chars": len(c),
                                   "bytes": len(c.encode("utf-8")), "greedy": g})
    hits = {m: [] for m in METRICS}
    for r in rows:
        ch = r["choices"]
        ll = np.array([c["loglikelihood"] for c in ch])
        score = {"acc": ll, "acc_norm": ll / np.array([c["chars"] for c in ch]),
                 "acc_bytes": ll / np.array([c["bytes"] for c in ch]),
                 "acc_token_mean": ll / np.array([c["tokens"] for c in ch])}
        r["pred"] = {m: int(np.argmax(s)) for m, s in score.items()}
        for m in METRICS:
            hits[m].append(float(r["pred"][m] == r["label"]))
    metrics = {m: {"value": float(np.mean(hits[m])), "stderr": bootstrap_stderr(hits[m], n_boot, seed)}
               for m in METRICS}
    data_hash = sha256_text(t for ex, p in zip(examples, pre) for t in [p + ex["context"], *ex["choices"],
                                                                      str(ex["label"])])
    return {"metrics": metrics, "n": len(examples), "num_fewshot": num_fewshot, "fewshot_seed": seed,
            "data_sha256": data_hash, "chance": float(np.mean([1 / len(ex["choices"]) for ex in examples])),
            "examples": rows}


def load_task(name_or_path: str) -> tuple[list[dict], str]:
    """A built-in task's name or a JSONL path -> (examples, the file read)."""
    p = BUILTIN.get(name_or_path, Path(name_or_path))
    if not p.is_file():
        raise FileNotFoundError(f"{name_or_path}: no such task file (built-in tasks: {', '.join(BUILTIN)})")
    ex = read_jsonl(p)
    check_examples(ex, str(p))
    return ex, str(p)


# ---- the built-in task -----------------------------------------------------------------------

def _function_lines(text: str):
    """Line lists of each function in a Python source (nested ones too), from its def line."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.split("\n")
    return [lines[n.lineno - 1:n.end_lineno] for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 3]


def _line_ok(line: str) -> bool:
    s = line.strip()
    return len(s) >= 10 and not s.startswith(("#", '"', "'", "@")) and len(line) <= 100


def make_nextline(texts: list[str], n: int = 400, seed: int = 0, n_choices: int = 4, max_context: int = 12) -> list[dict]:
    """The ``nextline`` task from Python sources (deterministic for given texts and seed)."""
    rng = np.random.default_rng(seed)
    per_doc = [_function_lines(t) for t in texts]
    pool = [(d, ln.strip()) for d, fns in enumerate(per_doc) for fn in fns for ln in fn[1:] if _line_ok(ln)]
    cands = [(d, fn, k) for d, fns in enumerate(per_doc) for fn in fns for k in range(1, len(fn)) if _line_ok(fn[k])]
    if len(cands) < n or len(set(d for d, _ in pool)) < 2:
        raise ValueError(f"the sources give {len(cands)} candidate lines; {n} asked for")
    out = []
    for ci in rng.permutation(len(cands)):
        d, fn, k = cands[ci]
        answer = fn[k]
        indent = answer[:len(answer) - len(answer.lstrip())]
        wrong: list[str] = []
        while len(wrong) < n_choices - 1:
            d2, s = pool[int(rng.integers(len(pool)))]
            if d2 != d and s != answer.strip() and indent + s not in wrong:
                wrong.append(indent + s)
        choices = [answer] + wrong
        order = rng.permutation(n_choices).tolist()
        out.append({"context": "\n".join(fn[max(0, k - max_context):k]) + "\n",
                    "choices": [choices[o] + "\n" for o in order], "label": order.index(0)})
        if len(out) == n:
            break
    return out


def write_builtin(n: int = 400, seed: int = 0) -> Path:
    """Regenerate tinylm/eval/data/nextline.jsonl from this Python's standard library."""
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from tinylm.eval.common import write_jsonl  # noqa: PLC0415
    from tinylm.eval.ppl import builtin_heldout  # noqa: PLC0415

    texts, names = builtin_heldout()
    ex = make_nextline(texts, n, seed)
    write_jsonl(BUILTIN["nextline"], ex)
    meta = {"made_by": "python -m tinylm.eval.mc", "python": sys.version.split()[0], "files": len(names),
            "examples": len(ex), "seed": seed}
    (DATA / "nextline.meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return BUILTIN["nextline"]


if __name__ == "__main__":
    print(write_builtin())
