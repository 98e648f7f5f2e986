"""``tinylm train`` and ``tinylm sample``.

``add_parser`` imports nothing heavy, so ``tinylm --help`` stays instant; the handlers import
the training code when they run. ``key=value`` overrides may stand anywhere on the command line
(tinylm.config.split_overrides takes them out before argparse sees the rest).
"""
from __future__ import annotations

import argparse
import sys

def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a GPT or Llama on text (default: Python's standard library source)",
        description="Train a language model. Settings come from the defaults (tinylm.train.TrainConfig), then "
                    "--config FILE (TOML), then key=value overrides anywhere on the line (e.g. n_layer=6 "
                    "lr=1e-3 model=llama), then the flags below.",
    )
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files (.txt, .gz, .jsonl) or directories, or one directory from `tinylm prepare`; "
                        "default: Python's standard library source")
    p.add_argument("--config", metavar="FILE", help="TOML file of TrainConfig keys (see examples/configs/)")
    p.add_argument("--out", metavar="DIR", help="output directory (checkpoint, log.jsonl, loss.png); default out/")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="steps of the schedule; with --resume, a smaller N stops early and a larger one needs --extend")
    p.add_argument("--time-budget", type=float, metavar="MIN", help="stop after this many minutes (with a checkpoint)")
    p.add_argument("--preset", choices=("hour", "overnight"),
                   help="size the model and schedule from this machine's measured speed to fill 60 minutes (hour) "
                        "or 8 hours (overnight), with that time budget; key=value settings given are kept")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint exactly where it stopped")
    p.add_argument("--extend", action="store_true",
                   help="with --resume and a larger --max-steps: continue the cosine from the current lr down to "
                        "min_lr at the new last step")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT (its checkpoints and log)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel on N processes: re-runs this command under mpiexec -n N (the mpi extra); "
                        "batch_size is per process")
    p.set_defaults(func=_train)

    s = sub.add_parser("sample", help="generate text from a checkpoint", description="Generate text from a checkpoint, streamed.")
    s.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint directory (OUT/checkpoint)")
    s.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    s.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to generate per sample (default 200)")
    s.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="sampling temperature; 0 is greedy (default 0.8)")
    s.add_argument("--top-k", type=int, default=None, metavar="K", help="sample only from the K most likely tokens")
    s.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample only from the smallest set of tokens whose probability reaches P (nucleus)")
    s.add_argument("--seed", type=int, default=None, help="random seed (sample i uses seed + i)")
    s.add_argument("--num-samples", type=int, default=1, metavar="N", help="how many samples (default 1)")
    s.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="run the model with its weights in this format (as a 16-bit run's working copy; the "
                        "compute stays fp32; default fp32)")
    s.set_defaults(func=_sample)


def _train(args: argparse.Namespace) -> int:
    from tinylm.config import from_layers  # noqa: PLC0415

    if args.nproc is not None:  # [distributed #14] started as N ranks under mpiexec; they run without --nproc
        from tinylm.distributed.launch import relaunch_cli  # noqa: PLC0415

        return relaunch_cli(args.nproc)
    from tinylm.train import TrainConfig, train  # noqa: PLC0415

    flags = {"data": args.data, "out_dir": args.out, "max_steps": args.max_steps, "time_budget": args.time_budget,
             "progress": False if args.no_progress else None}
    cfg, sources = from_layers(TrainConfig(), args.config, args.overrides, flags)
    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite, extend=args.extend, sources=sources,
                       preset=args.preset)
    except FloatingPointError as e:
        print(f"tinylm train: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        from pathlib import Path  # noqa: PLC0415

        link = Path(cfg.out_dir) / "checkpoint"
        kept = _step_of(link)
        print(f"\ninterrupted; kept: {link} at step {kept}" if kept is not None else
              "\ninterrupted before the first checkpoint: nothing was saved", file=sys.stderr)
        return 130
    steps_run = result["steps_run"]
    how = {"interrupted": "interrupted", "time_budget": "time budget spent"}.get(result["stopped"])
    print(f"\ntrained {steps_run} steps (now at step {result['steps']}) in {result['elapsed_s'] / 60:.1f} min "
          f"({result['tokens_per_s']:,.0f} tokens/s){'; ' + how if how else ''}; checkpoint: {result['checkpoint']} "
          f"(step {result['steps']}); loss curve: {result['out_dir']}/loss.png")
    if cfg.sample_tokens > 0 and result["stopped"] != "interrupted":
        from tinylm.generate import stream_text  # noqa: PLC0415

        tok, model = result["tokenizer"], result["model"]
        print(f"\n--- sample (prompt {cfg.sample_prompt!r}, temperature 0.8, top_k 40) ---")
        _print_stream(cfg.sample_prompt, stream_text(model, tok, cfg.sample_prompt, cfg.sample_tokens,
                                                     temperature=0.8, top_k=40, seed=cfg.seed))
    return 130 if result["stopped"] == "interrupted" else 0


def _step_of(link):
    import json  # noqa: PLC0415

    try:
        return json.loads((link / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _print_stream(prompt: str, pieces) -> None:
    sys.stdout.write(prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _sample(args: argparse.Namespace) -> int:
    from tinylm.generate import check_sampling, stream_text  # noqa: PLC0415
    from tinylm.train.checkpoint import load_model  # noqa: PLC0415

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    check_sampling(args.temperature, args.top_k, args.top_p)  # before anything is printed
    model, tok = load_model(args.ckpt)
    if args.dtype != "fp32":  # [amp #13]
        from tinylm.amp.formats import round_model  # noqa: PLC0415

        round_model(model, args.dtype)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        seed = None if args.seed is None else args.seed + i
        _print_stream(args.prompt, stream_text(model, tok, args.prompt, args.max_new_tokens,
                                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                               seed=seed))
    return 0
