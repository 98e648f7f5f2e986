"""The ``tinylm`` command.

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``; that
function must import nothing heavy (no numba, no numpy-heavy work) so ``tinylm --help`` stays
instant. The heavy imports happen inside the handler it installs with ``set_defaults(func=...)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from tinylm._version import __version__

# subcommand modules, in the order ``--help`` lists them; a module that is missing (a feature
# not built yet) is left out of the command rather than breaking it.
SUBCOMMANDS = (
    "tinylm.data.cli",        # tinylm prepare
    "tinylm.tokenizer.cli",   # tinylm tokenizer train/encode/decode
    "tinylm.train_cli",       # tinylm train, tinylm sample
    "tinylm.eval.cli",        # tinylm eval
    "tinylm.posttrain.cli",   # tinylm sft, dpo, grpo, chat, compare
    "tinylm.serve.cli",       # tinylm serve
)


# subcommands that take key=value overrides -> their options that take exactly one value
_OVERRIDABLE = {"train": {"--config", "--out", "--max-steps", "--time-budget"},
                **{k: {"--init", "--config", "--out", "--max-steps"} for k in ("sft", "dpo", "grpo")}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinylm",
        description="A language-model stack from first principles: tokenizer, GPT, training, sampling.",
    )
    parser.add_argument("--version", action="version", version=f"tinylm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # that feature is not part of this build
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tinylm.config import split_overrides  # noqa: PLC0415

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value overrides may stand anywhere (even after --data a b ...): take them out first
    overrides: list[str] = []
    if argv and argv[0] in _OVERRIDABLE:
        rest, overrides = split_overrides(argv[1:], _OVERRIDABLE[argv[0]])
        argv = argv[:1] + rest
    args = parser.parse_args(argv)
    args.overrides = overrides
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted (nothing is left half-written: files are written to temporaries and renamed)",
              file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        # user errors (bad file, bad flag value): one clear line, no traceback
        print(f"tinylm {args.command}: error: {_describe(e)}", file=sys.stderr)
        return 2
    return int(rc or 0)


def _describe(e: Exception) -> str:
    """An error as one line. An OSError from the system names the file the user asked for, not
    the temporary it was being written through (``tok.json.tmp1234`` -> ``tok.json``), and a
    missing parent directory is said."""
    if not isinstance(e, OSError) or e.filename is None or not e.strerror:
        return str(e)
    import errno  # noqa: PLC0415
    import os  # noqa: PLC0415
    import re  # noqa: PLC0415

    name = re.sub(r"\.(tmp|new)-?\d+(?=$|\.)", "", os.fsdecode(e.filename))
    msg = f"{name}: {e.strerror}"
    parent = os.path.dirname(name)
    if e.errno == errno.ENOENT and parent and not os.path.isdir(parent):
        msg += f" (the directory {parent} does not exist)"
    return msg


if __name__ == "__main__":
    sys.exit(main())
