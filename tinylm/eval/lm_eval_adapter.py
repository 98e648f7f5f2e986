"""A tinylm model class for EleutherAI's lm-evaluation-harness (``pip install 'tinylm[lm-eval]'``).

    import lm_eval
    from tinylm.eval.lm_eval_adapter import TinyLM
    lm_eval.simple_evaluate(model=TinyLM(ckpt="out/checkpoint"), tasks=[...])

or, once this module is imported, ``model="tinylm", model_args="ckpt=out/checkpoint"``. The three
request types are answered by the scorers ``tinylm eval`` uses, so the numbers agree:

- ``loglikelihood(context, continuation)``: tinylm.eval.mc.loglikelihoods (lm-eval's own
  tokenization rule: trailing context whitespace moves to the continuation);
- ``loglikelihood_rolling(text)``: the summed log-likelihood of every token of the text after an
  end-of-text token, sliding windows of the model's context with stride half of it
  (tinylm.eval.ppl);
- ``generate_until(context, {"until", "max_gen_toks", "temperature"})``: tinylm.eval.common.complete.

This module imports lm_eval (and with it torch) when it is imported; nothing else in tinylm
imports it. Leaves out: multiple GPUs / ranks, lm-eval's request caching.
"""
from __future__ import annotations

import zlib

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model


@register_model("tinylm")
class TinyLM(LM):
    def __init__(self, ckpt: str | None = None, batch_size: int | str = 8, model=None, tokenizer=None,
                 max_gen_toks: int = 256, **_):
        super().__init__()
        if model is None:
            import tinylm  # noqa: PLC0415

            if ckpt is None:
                raise ValueError("TinyLM needs ckpt=DIR (a tinylm checkpoint) or model= and tokenizer=")
            model, tokenizer = tinylm.load(ckpt)
        self.model, self.tok = model, tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        from tinylm.eval.mc import loglikelihoods  # noqa: PLC0415

        pairs = [tuple(r.args[:2]) for r in requests]
        return [(ll, greedy) for ll, _, greedy in loglikelihoods(self.model, self.tok, pairs, self.batch_size)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from tinylm.eval.ppl import score_stream, stream_of_texts  # noqa: PLC0415

        bs = self.model.config.block_size
        out = []
        for r in requests:
            tokens, keep, _ = stream_of_texts(self.tok, [r.args[0]])
            if len(tokens) < 2:
                out.append(0.0)
                continue
            res = score_stream(self.model, tokens, bs, max(1, bs // 2), keep, self.batch_size)
            out.append(-res["nll"])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        from tinylm.eval.common import complete  # noqa: PLC0415

        out = []
        for r in requests:
            context, kw = r.args[0], dict(r.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            t = float(kw.get("temperature", 0.0) or 0.0) if kw.get("do_sample", t_default(kw)) else 0.0
            out.append(complete(self.model, self.tok, context, 1, int(kw.get("max_gen_toks", self.max_gen_toks)),
                                stop=until, temperature=t, seed=zlib.crc32(context.encode("utf-8")))[0])
        return out


def t_default(kw: dict) -> bool:
    """lm-eval's convention: sampling only when a temperature above 0 is asked for."""
    return float(kw.get("temperature", 0.0) or 0.0) > 0
