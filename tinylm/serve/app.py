"""The HTTP side: routes, streaming, the API key; the decoding itself is the engine's.

Why Starlette + uvicorn (the ``serve`` extra): Starlette is a small ASGI toolkit (routing,
requests, ``StreamingResponse`` that notices a client's disconnect and cancels the stream) and
uvicorn the reference ASGI server (HTTP/1.1 from h11, keep-alive, graceful shutdown); both are
maintained by the Encode team, pure Python, and pull in only anyio and h11. FastAPI would add
pydantic models this server checks by hand anyway (tinylm.serve.api), aiohttp its own HTTP
stack; either would do, neither is needed.

Routes:

    POST /v1/completions         OpenAI completions (prompt), streamed as server-sent events or not
    POST /v1/chat/completions    OpenAI chat completions (messages)
    GET  /v1/models, /v1/models/{id}
    GET  /health                 {"status": "ok", slots, busy, waiting, ...}
    GET  /                       the chat page (page.html, one static file)

Each request becomes engine jobs (one per choice) and gets one asyncio queue; the engine thread
calls each job's ``emit``, which hands the event to that queue on the server's event loop
(``loop.call_soon_threadsafe``, once for all the events that arrive before the loop picks them
up), so the engine never waits for a client. A streamed response
that loses its client (Starlette cancels the stream) cancels its jobs in ``finally``, and the
engine frees their slots before its next step; a non-streamed one checks for a disconnect
while it waits. A full waiting line is a 503 with ``Retry-After``.

With an API key set, every route but the static page (which holds no data and asks for the key
itself) needs ``Authorization: Bearer KEY``: 401 otherwise.

Leaves out: TLS (put a proxy in front), rate limits per key, CORS (the page is served from the
same origin).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import threading
import time
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from tinylm.serve import api
from tinylm.serve.engine import Engine, Job, QueueFull

MAX_BODY = 1 << 20  # bytes of JSON a request may send


def _error(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(api.error_body(message, type, code), status_code=status, headers=headers)


class _APIKey:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every request but ``GET /``."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["path"] == "/" and scope["method"] in ("GET", "HEAD")):
            return await self.app(scope, receive, send)
        got = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = got.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            msg = "Incorrect API key provided" if got else "Missing API key: send Authorization: Bearer KEY"
            resp = _error(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


async def _read_json(request: Request):
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY:
        raise api.APIError(413, f"the request body is larger than {MAX_BODY} bytes")
    raw = b""
    async for part in request.stream():
        raw += part
        if len(raw) > MAX_BODY:
            raise api.APIError(413, f"the request body is larger than {MAX_BODY} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise api.APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None


class _Outbox:
    """Events from the engine thread to the requests' queues on the event loop. Events that
    arrive before the loop has run the last hand-over ride along with it, so a step of 16 rows
    wakes the loop once, not 16 times."""

    def __init__(self, loop):
        self.loop, self.items, self.lock, self.pending = loop, [], threading.Lock(), False

    def put(self, queue: asyncio.Queue, item) -> None:  # engine thread
        with self.lock:
            self.items.append((queue, item))
            if self.pending:
                return
            self.pending = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # event loop
        with self.lock:
            items, self.items, self.pending = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class Service:
    """The routes over one engine."""

    def __init__(self, engine: Engine, tokenizer, model_name: str = "tinylm"):
        self.engine = engine
        cfg = engine.model.config
        self.template = api.chat_template(tokenizer, cfg.vocab_size)
        self.ctx = api.Context(model_name, tokenizer, cfg.block_size, cfg.vocab_size, engine.n_slots, self.template)
        self.created = int(time.time())
        self.outbox: _Outbox | None = None  # made on the event loop, at the first request

    # ---- plain routes -----------------------------------------------------------------------
    async def page(self, request: Request):
        html = resources.files("tinylm.serve").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "model": self.ctx.model_name, "chat_template": self.template.name,
                             "block_size": self.ctx.block_size, **self.engine.load()})

    def _model(self) -> dict:
        return {"id": self.ctx.model_name, "object": "model", "created": self.created, "owned_by": "tinylm"}

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [self._model()]})

    async def model(self, request: Request):
        if request.path_params["name"] != self.ctx.model_name:
            return _error(404, f"The model {request.path_params['name']!r} does not exist", code="model_not_found")
        return JSONResponse(self._model())

    async def completions(self, request: Request):
        return await self._generate(request, "completion")

    async def chat(self, request: Request):
        return await self._generate(request, "chat")

    # ---- generation -------------------------------------------------------------------------
    async def _generate(self, request: Request, kind: str):
        try:
            plan = api.parse_request(kind, await _read_json(request), self.ctx)
        except api.APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        if self.outbox is None:
            self.outbox = _Outbox(asyncio.get_running_loop())
        queue: asyncio.Queue = asyncio.Queue()
        put = self.outbox.put

        def emitter(index):
            return lambda event: put(queue, (index, event))

        jobs = [Job(ids, params, emitter(i)) for i, ids, params in plan.jobs]
        try:
            self.engine.submit(jobs)
        except QueueFull as e:
            return _error(503, str(e), type="server_error", code="server_busy", headers={"Retry-After": "1"})
        rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + secrets.token_hex(12)
        created = int(time.time())
        if plan.stream:
            return StreamingResponse(self._stream(plan, rid, created, jobs, queue), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, plan, rid, created, jobs, queue)

    async def _collect(self, request, plan, rid, created, jobs, queue):
        texts = [[] for _ in jobs]
        reasons = [None] * len(jobs)
        n_tokens, left = 0, len(jobs)
        try:
            while left:
                try:
                    i, ev = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return _error(499, "the client closed the request")
                    continue
                if ev[0] == "text":
                    texts[i].append(ev[1])
                elif ev[0] == "end":
                    reasons[i], left, n_tokens = ev[1], left - 1, n_tokens + ev[2]
                else:
                    return _error(500, ev[1], type="server_error")
        finally:
            for j in jobs:
                j.cancel()  # a no-op for finished jobs; frees the slots of the rest
        return JSONResponse(api.response(plan, rid, created, ["".join(t) for t in texts], reasons, n_tokens))

    async def _stream(self, plan, rid, created, jobs, queue):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

        n_tokens, left = 0, len(jobs)
        try:
            if plan.kind == "chat":
                for i in range(len(jobs)):
                    yield sse(api.chunk(plan, rid, created, i, role=True))
            while left:
                i, ev = await queue.get()
                if ev[0] == "text":
                    yield sse(api.chunk(plan, rid, created, i, text=ev[1]))
                elif ev[0] == "end":
                    left, n_tokens = left - 1, n_tokens + ev[2]
                    yield sse(api.chunk(plan, rid, created, i, finish_reason=ev[1]))
                else:
                    yield sse(api.error_body(ev[1], type="server_error"))
                    return
            if plan.include_usage:
                yield sse(api.chunk(plan, rid, created, None, usage_=api.usage(plan.prompt_tokens, n_tokens)))
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: Starlette cancels this generator
            for j in jobs:
                j.cancel()


def create_app(engine: Engine, tokenizer, model_name: str = "tinylm", api_key: str | None = None):
    """The ASGI app; the engine thread starts and stops with it (ASGI lifespan)."""
    svc = Service(engine, tokenizer, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    async def http_error(request, exc: HTTPException):
        return _error(exc.status_code, exc.detail or "error", code="not_found" if exc.status_code == 404 else None)

    async def server_error(request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    routes = [
        Route("/", svc.page, methods=["GET"]),
        Route("/health", svc.health, methods=["GET"]),
        Route("/v1/models", svc.models, methods=["GET"]),
        Route("/v1/models/{name:path}", svc.model, methods=["GET"]),
        Route("/v1/completions", svc.completions, methods=["POST"]),
        Route("/v1/chat/completions", svc.chat, methods=["POST"]),
    ]
    middleware = [Middleware(_APIKey, key=api_key)] if api_key else []
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.service = svc
    return app


class Running:
    """A uvicorn server on its own thread, for tests and benchmarks:

        with Running(app, port=0) as srv:   # port 0: a free port, then srv.port
            ... http://127.0.0.1:{srv.port} ...
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket  # noqa: PLC0415

        import uvicorn  # noqa: PLC0415

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(2048)  # from now on a client's connection waits in the backlog, not refused
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "Running":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
