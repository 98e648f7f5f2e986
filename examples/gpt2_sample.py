"""Load GPT-2 from Hugging Face files and sample from it, with tinylm only.

    python examples/gpt2_sample.py DIR --prompt "The meaning of life is" [--max-new-tokens 60]

DIR holds what the Hugging Face hub has for ``openai-community/gpt2`` (or gpt2-medium, ...):
``config.json``, ``model.safetensors``, ``vocab.json``, ``merges.txt``. Download them yourself,
e.g. ``huggingface-cli download openai-community/gpt2 config.json model.safetensors vocab.json
merges.txt --local-dir gpt2``; tinylm never touches the network.

``GPT.from_hf`` copies the tensors by name (GPT-2's Conv1D layout is tinylm's); the tokenizer
is ``BPETokenizer.from_gpt2_files``; tokens are printed as they come, through an incremental
UTF-8 decoder (a token can end inside a multi-byte character).
Leaves out: float16 checkpoints, sharded checkpoints, beam search.
"""
from __future__ import annotations

import argparse
import codecs
import sys
import time
from pathlib import Path

from tinylm.models import GPT
from tinylm.tokenizer import BPETokenizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="directory with config.json, model.safetensors, vocab.json, merges.txt")
    ap.add_argument("--prompt", default="The meaning of life is")
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    d = Path(args.dir)
    missing = [f for f in ("config.json", "model.safetensors", "vocab.json", "merges.txt") if not (d / f).is_file()]
    if missing:
        print(f"{d}: missing {', '.join(missing)} (see this script's docstring for how to get them)", file=sys.stderr)
        return 2
    t = time.perf_counter()
    model = GPT.from_hf(d)
    tok = BPETokenizer.from_gpt2_files(d / "vocab.json", d / "merges.txt")
    c = model.config
    print(f"loaded {model.num_params() / 1e6:.1f}M parameters ({c.n_layer} layers, {c.n_embd} wide, "
          f"vocab {c.vocab_size}) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    ids = tok.encode(args.prompt) if args.prompt else [tok.eot_id]
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(args.prompt)
    t, n = time.perf_counter(), 0
    stop = () if tok.eot_id is None else (tok.eot_id,)
    for nxt in model.generate_iter([ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, seed=args.seed, stop_tokens=stop):
        n += 1
        if int(nxt[0]) in stop:
            break
        sys.stdout.write(dec.decode(tok.decode_bytes([int(nxt[0])])))
        sys.stdout.flush()
    sys.stdout.write(dec.decode(b"", final=True) + "\n")
    print(f"{n} tokens in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
