"""Exact match: does the model's greedy answer to a prompt equal the expected answer?

``exact_match(model, tok, [{"prompt": ..., "answer": ...}, ...])`` generates greedily from each
prompt until end-of-text, one of the ``stop`` strings (default: a newline, for one-line
answers) or ``max_new_tokens``, and compares the completion with the answer after
``normalize`` (default: leading and trailing whitespace removed). It reports the share of exact
matches with its standard error (the bootstrap over examples, and the binomial
sqrt(p (1 - p) / n) beside it) and every example's completion.

This is the post-training checkable task's scorer: a task that can be checked by string
equality plugs in by giving a list of prompt/answer dicts (``--task exact --data FILE.jsonl``).
Leaves out: answer extraction by regular expression, partial credit.
"""
from __future__ import annotations

import math

from tinylm.eval.common import bootstrap_stderr, complete, sha256_text


def _strip(s: str) -> str:
    return s.strip()


def exact_match(model, tok, examples: list[dict], max_new_tokens: int = 32, stop=("\n",), normalize=None,
                n_boot: int = 1000, seed: int = 0) -> dict:
    """-> {"exact_match", "stderr", "stderr_binomial", "n", "data_sha256", "examples"}."""
    norm = normalize or _strip
    rows, hits = [], []
    for n, ex in enumerate(examples, 1):
        if not isinstance(ex.get("prompt"), str) or not isinstance(ex.get("answer"), str):
            raise ValueError(f"example {n}: need string 'prompt' and 'answer' fields")
        got = complete(model, tok, ex["prompt"], 1, max_new_tokens, stop=stop or (), temperature=0.0)[0]
        ok = norm(got) == norm(ex["answer"])
        hits.append(float(ok))
        rows.append({"index": n - 1, "prompt": ex["prompt"], "answer": ex["answer"], "completion": got, "correct": ok})
    p = sum(hits) / len(hits) if hits else float("nan")
    return {"exact_match": p, "stderr": bootstrap_stderr(hits, n_boot, seed),
            "stderr_binomial": math.sqrt(p * (1 - p) / len(hits)) if hits else float("nan"), "n": len(hits),
            "max_new_tokens": max_new_tokens, "stop": list(stop or ()),
            "data_sha256": sha256_text(t for ex in examples for t in (ex["prompt"], ex["answer"])), "examples": rows}
