"""Serving: an OpenAI-compatible HTTP server with batched decoding, and a chat page.

    engine.py   the decoding loop on one background thread: slots, a bounded waiting line, one
                batched step for every running request; requests join and leave between steps
    api.py      OpenAI's request checks and response shapes (no HTTP), the chat template switch
    app.py      the Starlette routes over an engine: streaming (server-sent events), API key
    page.html   the chat page served at / (one static file, no build step)
    cli.py      ``tinylm serve``

Needs the ``serve`` extra (Starlette, uvicorn): ``pip install -e '.[serve]'``.
"""
