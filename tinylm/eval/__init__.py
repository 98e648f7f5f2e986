"""tinylm.eval: score a trained model.

    perplexity(model, tokens, ...)          nats/token, perplexity, bits per byte; two window plans   (ppl.py)
    mc_eval(model, tok, examples)           multiple choice: acc, acc_norm, acc per byte, token mean  (mc.py)
    exact_match(model, tok, examples)       greedy answer == expected answer, with a standard error   (exact.py)
    humaneval: read_problems, generate_samples, check_samples, pass_at_k, sanity  (humaneval.py)
    syntax_eval(model, tok)                 share of sampled completions that parse as Python        (syntax.py)
    context_study                           one model trained at contexts 256/512/1024, compared    (context_study.py)
    lm_eval_adapter                         a tinylm model class for lm-evaluation-harness (optional) (lm_eval_adapter.py)

``tinylm eval`` (cli.py, tasks.py) runs each as a task and writes every number with its settings.
Names load on first use, so ``tinylm --help`` imports none of this.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "perplexity": "tinylm.eval.ppl", "plan_windows": "tinylm.eval.ppl", "score_stream": "tinylm.eval.ppl",
    "mc_eval": "tinylm.eval.mc", "loglikelihoods": "tinylm.eval.mc", "load_task": "tinylm.eval.mc",
    "exact_match": "tinylm.eval.exact",
    "pass_at_k": "tinylm.eval.humaneval",
    "syntax_eval": "tinylm.eval.syntax",
    "sequence_logprobs": "tinylm.eval.common", "complete": "tinylm.eval.common",
    "bootstrap_stderr": "tinylm.eval.common",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tinylm.eval' has no attribute {name!r}")
