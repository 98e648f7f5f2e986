"""Syntax: the share of a code model's sampled completions that parse as Python.

For each prompt and temperature, ``n`` completions of ``max_new_tokens`` are sampled (cut at
end-of-text). A completion that ran out of tokens usually stops mid-line, so only its whole
lines count: the text after its last newline is dropped. Then ``prompt + completion`` is given
to ``ast.parse``; the share that parses is reported per temperature, with a bootstrap standard
error over samples, and the first error of each one that does not.

The default prompts are starts of Python files, functions and classes; ``--prompts FILE`` takes
one prompt per JSONL line (``{"prompt": ...}``).

Leaves out: whether the code runs (that is HumanEval), indentation-only repairs.
"""
from __future__ import annotations

import ast

from tinylm.eval.common import bootstrap_stderr, complete, sha256_text

PROMPTS = ("import os\n", "def ", "class ", "    def __init__(self", "def main():\n    ", "for i in range(",
           "if __name__ == '__main__':\n", "try:\n    ")


def whole_lines(text: str, finished: bool) -> str:
    """The completion up to its last newline, unless it ended on its own (end-of-text)."""
    return text if finished or "\n" not in text else text[:text.rfind("\n") + 1]


def parses(source: str) -> tuple[bool, str]:
    try:
        ast.parse(source)
        return True, ""
    except SyntaxError as e:
        return False, f"{e.msg} (line {e.lineno})"
    except ValueError as e:  # a NUL byte
        return False, str(e)


def syntax_eval(model, tok, prompts=PROMPTS, temperatures=(0.2, 0.8, 1.0), n: int = 8, max_new_tokens: int = 128,
                top_k: int | None = None, seed: int = 0, n_boot: int = 1000) -> dict:
    """-> {"by_temperature": {t: {"parse_rate", "stderr", "samples"}}, "examples": rows}."""
    rows, by_t = [], {}
    for t in temperatures:
        hits = []
        for i, p in enumerate(prompts):
            outs = complete(model, tok, p, n, max_new_tokens, temperature=t, top_k=top_k, seed=seed + i,
                            with_ended=True)
            for j, (c, ended) in enumerate(outs):
                text = whole_lines(c, finished=ended)
                ok, err = parses(p + text)
                hits.append(float(ok))
                rows.append({"temperature": t, "prompt": p, "sample": j, "completion": c, "scored": text,
                             "parses": ok, "error": err})
        by_t[str(t)] = {"parse_rate": sum(hits) / len(hits), "stderr": bootstrap_stderr(hits, n_boot, seed),
                        "samples": len(hits)}
    return {"by_temperature": by_t, "n_per_prompt": n, "max_new_tokens": max_new_tokens, "top_k": top_k,
            "seed": seed, "prompts": len(prompts), "prompts_sha256": sha256_text(prompts), "examples": rows}
