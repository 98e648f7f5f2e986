"""Train a GPT with a BPE tokenizer on tinyshakespeare, then sample from it.

    python examples/shakespeare.py path/to/tinyshakespeare.txt [key=value ...]

The text is not shipped with tinylm. Get it (1.1 MB, the 40,000 lines Karpathy's char-rnn used):

    curl -O https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt

Settings: examples/configs/shakespeare.toml (a 1024-token BPE, 4 layers, dropout 0.1). The
tokenizer is trained on the file by ``tinylm.train`` and cached in ``out_dir``. Validation is
every 20th piece of the text (the file is one document, so ``tinylm.corpus`` cuts it by lines).
Leaves out: a character-level tokenizer (BPE is tinylm's one tokenizer; with vocab_size=257 it
is nearly byte level).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinylm.config import apply_dict, apply_overrides, load_toml
from tinylm.train import TrainConfig, train

CONFIG = Path(__file__).resolve().parent / "configs" / "shakespeare.toml"
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", default="tinyshakespeare.txt", help="the text file (default: ./tinyshakespeare.txt)")
    ap.add_argument("--config", default=str(CONFIG), help="TOML file of TrainConfig keys")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)
    if "=" in args.path and not Path(args.path).exists():  # only overrides were given
        args.overrides.insert(0, args.path)
        args.path = "tinyshakespeare.txt"
    if not Path(args.path).is_file():
        print(f"{args.path}: not found. tinyshakespeare is not shipped with tinylm; download it with\n"
              f"    curl -o tinyshakespeare.txt {URL}\n"
              f"and pass its path: python examples/shakespeare.py tinyshakespeare.txt", file=sys.stderr)
        return 2
    cfg = load_toml(TrainConfig(), args.config)
    cfg = apply_dict(cfg, {"data": [args.path]}, where="command line")
    cfg = apply_overrides(cfg, args.overrides)
    result = train(cfg)
    print(f"\n{result['steps']} steps, {result['tokens_per_s']:,.0f} tokens/s; validation: {result['val']}")
    model, tok = result["model"], result["tokenizer"]
    out = model.generate(tok.encode(cfg.sample_prompt), cfg.sample_tokens, temperature=0.8, top_k=40, seed=cfg.seed)
    print(f"--- sample ---\n{tok.decode(out.tolist())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
