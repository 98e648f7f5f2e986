"""Perplexity of a small random GPT-2 exported with save_hf equals the perplexity Hugging Face
computes from the same weights over the same windows (optional: needs transformers and torch)."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tinylm.eval import ppl  # noqa: E402
from tinylm.models import GPT, GPTConfig  # noqa: E402


@pytest.mark.slow  # importing torch and transformers alone takes 10-100 s on these machines
@pytest.mark.parametrize("stride", [32, 12])
def test_perplexity_equals_hugging_faces(tmp_path, stride):
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=300), seed=3).eval()
    model.save_hf(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    tokens = np.random.default_rng(0).integers(0, 300, 190)
    ours = ppl.perplexity(model, tokens, window=32, stride=stride)["sliding"]
    # Hugging Face's model on the same windows; the loss is torch's cross_entropy with targets
    # -100 for context-only positions (the "perplexity of fixed-length models" recipe)
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in ppl.plan_windows(len(tokens), 32, stride):
            logits = hf(torch.tensor(tokens[None, begin:end])).logits[0].double()  # (T, V)
            labels = torch.tensor(tokens[begin + 1:end + 1])
            labels[:first - begin - 1] = -100
            nll += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    assert count == ours["tokens_scored"]
    assert ours["perplexity"] == pytest.approx(math.exp(nll / count), rel=2e-5)
