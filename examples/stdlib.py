"""Train a GPT on the source of Python's standard library, then sample from it.

    python examples/stdlib.py                      # examples/configs/stdlib.toml, ~10 min on 2 cores
    python examples/stdlib.py max_steps=200 n_layer=2

The same run as ``tinylm train --config examples/configs/stdlib.toml``, written out as the few
library calls it is: read a TOML config into ``TrainConfig``, apply ``key=value`` overrides
(checked against the config's fields and types), ``train`` (which trains a BPE tokenizer on the
corpus, caches the tokens, trains, validates, checkpoints and plots), then ``generate``.
Outputs go to ``out_dir`` (default out/stdlib): checkpoint/, log.jsonl, loss.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinylm.config import apply_overrides, load_toml
from tinylm.train import TrainConfig, train

CONFIG = Path(__file__).resolve().parent / "configs" / "stdlib.toml"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(CONFIG), help="TOML file of TrainConfig keys")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)
    cfg = apply_overrides(load_toml(TrainConfig(), args.config), args.overrides)
    result = train(cfg)
    print(f"\n{result['steps']} steps, {result['tokens_per_s']:,.0f} tokens/s; validation: {result['val']}")
    model, tok = result["model"], result["tokenizer"]
    prompt = tok.encode(cfg.sample_prompt)
    out = model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=40, seed=cfg.seed,
                         stop_tokens=() if tok.eot_id is None else (tok.eot_id,))
    print(f"--- sample ---\n{tok.decode(out.tolist())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
