"""``tinylm prepare``: clean, deduplicate, split and tokenize a corpus into token shards.

    tinylm prepare --data PATH... --out DIR [--tokenizer FILE] [--vocab-size N]
                   [--val-fraction F] [--shard-tokens N] [--workers N] [--dedup exact|near|off]
                   [--redact] [--include GLOB] [--exclude GLOB] [--text-field NAME] [--seed N]

``add_parser`` imports nothing heavy (``tinylm --help`` stays instant); the handler imports
the pipeline. Prints the report at the end; the full report is in ``DIR/manifest.json``.
"""
from __future__ import annotations

import argparse
import json


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _fraction(s: str) -> float:
    v = float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="clean, deduplicate and tokenize a corpus into token shards",
        description="Clean, filter, deduplicate, split (train/val by document) and tokenize text "
                    "files, directories, JSONL and .gz files into .npy token shards with a manifest.")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text/JSONL/.gz files or directories (searched recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="tokenizer JSON; default: train one on the train split")
    p.add_argument("--vocab-size", metavar="N", type=_positive_int, default=4096,
                   help="vocab size when training (default 4096)")
    p.add_argument("--tokenizer-train-mb", metavar="MB", type=_positive_int, default=256,
                   help="train the tokenizer on at most this many MB of train text (default 256)")
    p.add_argument("--val-fraction", metavar="F", type=_fraction, default=0.05,
                   help="share of documents for validation (0.05)")
    p.add_argument("--shard-tokens", metavar="N", type=_positive_int, default=1 << 24,
                   help="tokens per shard (16777216)")
    p.add_argument("--workers", metavar="N", type=_positive_int, default=1,
                   help="worker processes (default 1; each costs 1-2 s to start, so small corpora are faster with 1)")
    p.add_argument("--dedup", choices=("exact", "near", "off"), default="exact",
                   help="exact: identical after whitespace normalisation; near: also MinHash/LSH")
    p.add_argument("--near-threshold", metavar="F", type=_fraction, default=0.8,
                   help="Jaccard threshold for --dedup near")
    p.add_argument("--num-perm", metavar="N", type=_positive_int, default=128,
                   help="MinHash permutations for --dedup near")
    p.add_argument("--redact", action="store_true", help="replace e-mails, phone numbers and IPs")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only files matching (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip files matching (repeatable)")
    p.add_argument("--text-field", default="text", metavar="NAME", help="JSONL field holding the text")
    p.add_argument("--seed", metavar="N", type=int, default=0, help="seed of the train/val split and MinHash")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from tinylm.data.pipeline import prepare
    from tinylm.data.report import format_report

    report = prepare(args.data, args.out, args.tokenizer, val_fraction=args.val_fraction,
                     shard_tokens=args.shard_tokens, workers=args.workers, dedup=args.dedup,
                     redact=args.redact, seed=args.seed, progress=not args.no_progress,
                     vocab_size=args.vocab_size, include=args.include, exclude=args.exclude,
                     text_field=args.text_field, near_threshold=args.near_threshold,
                     num_perm=args.num_perm, overwrite=args.overwrite,
                     tokenizer_train_bytes=args.tokenizer_train_mb << 20)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    print(f"wrote {args.out}")
    return 0
