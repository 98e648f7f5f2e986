"""``tinylm serve --ckpt DIR``: an OpenAI-compatible server and a chat page for one checkpoint.

``add_parser`` imports nothing heavy; the handler imports the model, Starlette and uvicorn
(``pip install -e '.[serve]'``) when it runs.
"""
from __future__ import annotations

import argparse
import os
import sys

ENV_KEY = "TINYLM_API_KEY"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a checkpoint over HTTP (OpenAI API + a chat page)",
        description="Serve a checkpoint: POST /v1/completions and /v1/chat/completions (OpenAI's shapes, streamed "
                    "or not), GET /v1/models, GET /health, and a chat page at /. Concurrent requests are decoded "
                    "together in one batch. Needs the serve extra: pip install -e '.[serve]'.")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint directory (OUT/checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one and prints it)")
    p.add_argument("--slots", type=int, default=16, metavar="N",
                   help="requests decoded together, one KV-cache row each (default 16)")
    p.add_argument("--queue", type=int, default=64, metavar="N",
                   help="requests that may wait for a slot; past that the server answers 503 (default 64)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads for the model's kernels (default: $TINYLM_NUM_THREADS, else every core but one, "
                        "which is left to the HTTP side)")
    p.add_argument("--model-name", default="tinylm", metavar="NAME",
                   help="the model id clients send and /v1/models lists (default tinylm)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require Authorization: Bearer KEY on every request (default: ${ENV_KEY} if set, else none)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    # Numba's OpenMP workers sleep between kernels instead of spinning, before OpenMP is loaded.
    # A server's event loop needs a core between the engine's kernels; measured with
    # benchmarks/serve.py on 2 shared cores, one client: 12-40 tokens/s and 26.7 ms of server CPU
    # per token with the spinning default, 126 tokens/s and 6.9 ms with PASSIVE, minutes apart.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.slots < 1 or args.queue < 0:
        raise ValueError(f"--slots must be >= 1 and --queue >= 0, got {args.slots} and {args.queue}")
    import importlib.util  # noqa: PLC0415

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{' and '.join(missing)} not installed: pip install -e '.[serve]'")
    from tinylm.serve.app import Running, create_app  # noqa: PLC0415
    from tinylm.serve.engine import Engine  # noqa: PLC0415

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    key = args.api_key if args.api_key is not None else os.environ.get(ENV_KEY) or None
    model, tok = _load(args.ckpt)
    from kernels._threads import default_threads  # noqa: PLC0415

    # a kernel thread per core but one: the event loop needs a core between steps, and a
    # parallel kernel waits at its barrier for a thread that lost its core. benchmarks/serve.py
    # on 2 cores, 1 thread vs 2: 144-150 vs 121-130 tokens/s for one client, 595-611 vs 471-528
    # for 16
    threads = args.threads or (None if os.environ.get("TINYLM_NUM_THREADS") else max(1, default_threads() - 1))
    engine = Engine(model, tok, slots=args.slots, queue_size=args.queue, threads=threads)
    app = create_app(engine, tok, model_name=args.model_name, api_key=key)
    srv = Running(app, args.host, args.port)  # binds now: a busy port is an error here
    template = app.state.service.template.name
    c = model.config
    print(f"serving {args.ckpt} ({model.model_type}, {c.n_layer} layers, context {c.block_size}, vocab {c.vocab_size}; "
          f"chat template: {template}) on {srv.url} with {args.slots} slots; "
          f"API key {'required' if key else 'not required'}", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print("warning: listening beyond this machine with no API key", file=sys.stderr, flush=True)
    try:
        srv.server.run(sockets=[srv.sock])  # in this thread: Ctrl-C stops it gracefully
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
        pass
    print("stopped", flush=True)
    return 0


def _load(ckpt):
    """(model, tokenizer): post-training's loader when it is there (it also takes a LoRA
    adapter checkpoint, merged into its base), else a plain checkpoint."""
    try:
        from tinylm.posttrain.stage import load_policy  # noqa: PLC0415
    except ImportError:
        from tinylm.train.checkpoint import load_model as load_policy  # noqa: PLC0415
    model, tok = load_policy(ckpt)
    return model.eval(), tok
