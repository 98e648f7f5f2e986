"""The lm-evaluation-harness adapter gives the log-likelihoods `tinylm eval mc` gives, on a local
JSONL task defined in a task YAML (offline). Skipped when lm-eval is not installed: it pulls
torch, so it is not part of the dev extra (pip install 'tinylm[lm-eval]')."""
from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from tinylm.eval import mc  # noqa: E402
from tinylm.models import GPT, GPTConfig  # noqa: E402
from tinylm.tokenizer import BPETokenizer  # noqa: E402

TASK_YAML = """task: tinylm_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow  # lm-eval's import (torch, datasets) and its dataset loading: ~1-3 min
def test_adapter_loglikelihoods_equal_tinylm_mc(tmp_path):
    from lm_eval.tasks import TaskManager

    from tinylm.eval.lm_eval_adapter import TinyLM

    examples, _ = mc.load_task("nextline")
    examples = examples[:12]
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    (tmp_path / "task.yaml").write_text(TASK_YAML.format(path=data))
    texts = [e["context"] + c for e in examples for c in e["choices"]]
    tok = BPETokenizer().train(texts, 400, special_tokens=("<|endoftext|>",), progress=False)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=128, vocab_size=tok.vocab_size), seed=0).eval()

    ours = mc.mc_eval(model, tok, examples)
    res = lm_eval.simple_evaluate(model=TinyLM(model=model, tokenizer=tok), tasks=["tinylm_local_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
                                  num_fewshot=0)
    samples = sorted(res["samples"]["tinylm_local_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(examples)
    for s, row in zip(samples, ours["examples"]):
        theirs = [float(r[0][0]) for r in s["resps"]]
        mine = [c["loglikelihood"] for c in row["choices"]]
        # the same scorer; lm-eval batches the requests in its own order, which changes only BLAS sums
        assert theirs == pytest.approx(mine, abs=1e-4)
    metrics = res["results"]["tinylm_local_mc"]
    assert metrics["acc,none"] == pytest.approx(ours["metrics"]["acc"]["value"])
    assert metrics["acc_norm,none"] == pytest.approx(ours["metrics"]["acc_norm"]["value"])
