"""``tinylm sft``, ``dpo``, ``grpo``, ``chat`` and ``compare``.

``add_parser`` imports nothing heavy; the handlers import the post-training code when they run.
Settings are the fields of the stage's config (tinylm.posttrain.stage: SFTConfig, DPOConfig,
GRPOConfig), as ``key=value`` anywhere on the line, after ``--config FILE`` (TOML).
"""
from __future__ import annotations

import argparse
import json
import sys

_STAGES = {
    "sft": "supervised fine-tuning on chat data (default: the built-in Python-values task)",
    "dpo": "Direct Preference Optimization on {prompt, chosen, rejected} pairs (default: built-in task pairs)",
    "grpo": "RL with a verifiable reward: group-relative policy gradient (default: built-in task, exact match)",
}


def _sampling(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens per answer at most (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample only from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling: the smallest set reaching P")
    p.add_argument("--seed", type=int, default=None, help="random seed")


def add_parser(sub) -> None:
    for name, help_ in _STAGES.items():
        p = sub.add_parser(name, help=help_, description=help_ + ". Settings: key=value anywhere on the line "
                           "(fields of tinylm.posttrain.stage's config for this stage), after --config FILE.")
        p.add_argument("--init", metavar="CKPT", help="checkpoint to start from (e.g. out/checkpoint)")
        p.add_argument("--data", nargs="+", metavar="FILE", help="JSONL files; default: the built-in task")
        p.add_argument("--out", metavar="DIR", help=f"output directory (default out-{name}/)")
        p.add_argument("--config", metavar="FILE", help="TOML file of settings")
        p.add_argument("--max-steps", type=int, metavar="N", help="steps of the schedule")
        p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint exactly where it stopped")
        p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        # [distributed #14] data-parallel (tinylm/distributed/posttrain.py)
        p.add_argument("--nproc", type=int, metavar="N",
                       help="data-parallel on N processes: re-runs this command under mpiexec -n N (the mpi "
                            "extra); batch_size is per process")
        p.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3),
                       help="with several processes, the ZeRO stage: 1 shards the optimizer state, 2 also the "
                            "gradients, 3 also the parameters (default 0)")
        p.set_defaults(func=_stage, stage=name)

    c = sub.add_parser("chat", help="chat with a checkpoint in the terminal",
                       description="A terminal chat: multi-turn, streamed; /reset starts over, /quit leaves.")
    c.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint (full or adapter-only)")
    c.add_argument("--system", default=None, help="a system message")
    _sampling(c)
    c.set_defaults(func=_chat)

    m = sub.add_parser("compare", help="collect human preferences between two models' answers (DPO format)",
                       description="Show two models' answers to each prompt side by side; pick 1 or 2 (or t: tie, "
                                   "s: skip, q: quit). Each pick is appended to --out at once as a DPO line.")
    m.add_argument("--ckpt", action="append", required=True, metavar="DIR", help="give twice: model A, model B")
    m.add_argument("--prompts", required=True, metavar="FILE", help="JSONL {\"prompt\": ...} or one prompt per line")
    m.add_argument("--out", required=True, metavar="FILE", help="preferences JSONL (appended)")
    _sampling(m)
    m.set_defaults(func=_compare)


def _stage(args: argparse.Namespace) -> int:
    from tinylm.config import from_layers  # noqa: PLC0415
    from tinylm.posttrain.stage import CONFIGS, run  # noqa: PLC0415

    if getattr(args, "nproc", None) is not None:  # [distributed #14] re-run as N ranks under mpiexec
        from tinylm.distributed.launch import relaunch_cli  # noqa: PLC0415

        return relaunch_cli(args.nproc)
    flags = {"init": args.init, "data": args.data, "out_dir": args.out, "max_steps": args.max_steps,
             "progress": False if args.no_progress else None}
    cfg, sources = from_layers(CONFIGS[args.stage](), args.config, args.overrides, flags)
    comm = _communicator(args, cfg)
    try:
        if comm is not None:
            from tinylm.distributed.posttrain import run_stage  # noqa: PLC0415

            result = run_stage(args.stage, cfg, comm, zero=args.zero, resume=args.resume, overwrite=args.overwrite,
                               sources=sources)
        else:
            result = run(args.stage, cfg, resume=args.resume, overwrite=args.overwrite, sources=sources)
    except FloatingPointError as e:
        print(f"tinylm {args.stage}: {e}", file=sys.stderr)
        return 3
    how = {"interrupted": "interrupted", "time_budget": "time budget spent"}.get(result["stopped"])
    print(f"\n{args.stage}: {result['steps_run']} steps (now at step {result['steps']}) in "
          f"{result['elapsed_s'] / 60:.1f} min{'; ' + how if how else ''}; skipped batches: "
          f"{result['skipped_batches']}; checkpoint: {result['checkpoint']}")
    return 130 if result["stopped"] == "interrupted" else 0


def _communicator(args, cfg):
    """[distributed #14] The ranks this stage runs on: under mpiexec, the job's communicator;
    in one process, a single-process one when resuming a checkpoint written by several ranks
    (so the global batch it was trained with carries over); else None (stage.run as always)."""
    from tinylm.distributed import SingleProcess, world  # noqa: PLC0415

    comm = world()
    if comm is not None:
        return comm
    if args.resume:
        from pathlib import Path  # noqa: PLC0415

        try:
            saved = json.loads((Path(cfg.out_dir) / "checkpoint" / "state.json").read_text())
        except (OSError, ValueError):
            return None  # stage.run says what is wrong with it
        if int(saved.get("world_size", 1)) > 1:
            return SingleProcess()
    return None


def _chat(args: argparse.Namespace) -> int:
    from tinylm.posttrain.compare import chat_loop  # noqa: PLC0415

    return chat_loop(args.ckpt, system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _compare(args: argparse.Namespace) -> int:
    from tinylm.posttrain.compare import compare  # noqa: PLC0415

    if len(args.ckpt) != 2:
        raise ValueError(f"--ckpt: give exactly two checkpoints (A and B), got {len(args.ckpt)}")
    n = compare(args.ckpt[0], args.ckpt[1], args.prompts, args.out, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(f"{n} preferences appended to {args.out}")
    return 0
