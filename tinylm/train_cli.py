"""``tinylm train`` and ``tinylm sample``.

``add_parser`` imports nothing heavy, so ``tinylm --help`` stays instant; the handlers import
the training code when they run.
"""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a GPT on text (default: Python's standard library source)",
        description="Train a GPT. Settings come from the defaults (tinylm.train.TrainConfig), then "
                    "--config FILE (TOML), then key=value overrides (e.g. n_layer=6 lr=1e-3).",
    )
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files or directories, or one directory from `tinylm prepare`")
    p.add_argument("--config", metavar="FILE", help="TOML file of TrainConfig keys (see examples/configs/)")
    p.add_argument("--out", metavar="DIR", help="output directory (checkpoint, log.jsonl, loss.png); default out/")
    p.add_argument("--max-steps", type=int, metavar="N")
    p.add_argument("--time-budget", type=float, metavar="MIN", help="stop after this many minutes (with a checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint exactly where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig overrides")
    p.set_defaults(func=_train)

    s = sub.add_parser("sample", help="generate text from a checkpoint", description="Generate text from a checkpoint, streamed.")
    s.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint directory (OUT/checkpoint)")
    s.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--num-samples", type=int, default=1)
    s.set_defaults(func=_sample)


def _train(args: argparse.Namespace) -> int:
    from tinylm.config import apply_dict, apply_overrides, load_toml  # noqa: PLC0415
    from tinylm.train import TrainConfig, train  # noqa: PLC0415

    cfg = TrainConfig()
    if args.config:
        cfg = load_toml(cfg, args.config)
    cfg = apply_overrides(cfg, args.overrides)
    flags = {"data": args.data, "out_dir": args.out, "max_steps": args.max_steps, "time_budget": args.time_budget}
    cfg = apply_dict(cfg, {k: v for k, v in flags.items() if v is not None}, where="command line")
    if args.no_progress:
        cfg = apply_dict(cfg, {"progress": False})
    try:
        result = train(cfg, resume=args.resume)
    except FloatingPointError as e:
        print(f"tinylm train: {e}", file=sys.stderr)
        return 3
    print(f"\ntrained {result['steps']} steps in {result['elapsed_s'] / 60:.1f} min "
          f"({result['tokens_per_s']:,.0f} tokens/s); checkpoint: {result['checkpoint']}; "
          f"loss curve: {result['out_dir']}/loss.png")
    if cfg.sample_tokens > 0:
        tok, model = result["tokenizer"], result["model"]
        print(f"\n--- sample (prompt {cfg.sample_prompt!r}, temperature 0.8, top_k 40) ---")
        _stream(model, tok, cfg.sample_prompt, cfg.sample_tokens, 0.8, 40, None, cfg.seed)
    return 0


def _stream(model, tok, prompt: str, n: int, temperature, top_k, top_p, seed) -> None:
    import codecs  # noqa: PLC0415

    ids = tok.encode(prompt, allowed_special="all") if prompt else [tok.eot_id if tok.eot_id is not None else 0]
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(prompt)
    stop = () if tok.eot_id is None else (tok.eot_id,)
    for nxt in model.generate_iter([ids], n, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop):
        t = int(nxt[0])
        if t == tok.eot_id:
            break
        sys.stdout.write(dec.decode(tok.decode_bytes([t])))
        sys.stdout.flush()
    sys.stdout.write(dec.decode(b"", final=True) + "\n")


def _sample(args: argparse.Namespace) -> int:
    from tinylm.checkpoint import load_model  # noqa: PLC0415

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, tok = load_model(args.ckpt)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        seed = None if args.seed is None else args.seed + i
        _stream(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, seed)
    return 0
