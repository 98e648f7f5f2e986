"""tinylm serve: the engine alone, then the server on a free local port through the official
``openai`` client (and raw HTTP for what a client library would refuse to send).

One tiny GPT (2 layers, 32 wide, context 64) on a 300-token BPE trained here; its matrices are
redrawn with a large spread so greedy decoding does not repeat one token, which makes the
equalities below (streamed = not streamed, batched = alone, server = ``tinylm sample``) bite.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from tinylm.models import GPT, GPTConfig  # noqa: E402
from tinylm.serve import api  # noqa: E402
from tinylm.serve.app import Running, create_app  # noqa: E402
from tinylm.serve.engine import Engine, Job, Params, QueueFull, TextOut  # noqa: E402
from tinylm.tokenizer import BPETokenizer  # noqa: E402
from tinylm.train.checkpoint import save_checkpoint  # noqa: E402

BLOCK = 64
TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
        "User: hello there\nAssistant: hi, how can I help?\n") * 40


def tiny_model(vocab: int, seed: int = 0, block: int = BLOCK) -> GPT:
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block, vocab_size=vocab), seed=seed)
    rng = np.random.default_rng(seed)
    for _, p in m.named_parameters():
        if p.ndim == 2:
            p.data[...] = rng.normal(0.0, 0.5, p.shape).astype(p.data.dtype)
    return m.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = BPETokenizer().train(TEXT, 300, progress=False)
    model = tiny_model(tok.vocab_size)
    link = tmp_path_factory.mktemp("serve") / "checkpoint"
    save_checkpoint(link, model, None, {"step": 0, "model_type": "gpt", "model_config": model.config_dict()}, tok)
    return link, model, tok


@pytest.fixture(scope="module")
def server(ckpt):
    _, model, tok = ckpt
    engine = Engine(model, tok, slots=4, queue_size=4)
    with Running(create_app(engine, tok, model_name="tiny")) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def post(url: str, body, headers=None, raw: bytes | None = None):
    """(status, decoded JSON) of a POST; ``raw`` sends bytes as they are."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            body = r.read()
            return r.status, (json.loads(body) if r.headers.get_content_type() == "application/json" else body.decode())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---- pieces without HTTP --------------------------------------------------------------------
@pytest.mark.parametrize("pieces, stops, shown, stopped", [
    (["hi\nUs", "e", "r: more"], ["\nUser:"], "hi", True),     # a stop string split over three tokens
    (["hi\nUs", "ed to"], ["\nUser:"], "hi\nUsed to", False),  # a false start is shown once it is one
    (["abc"], [], "abc", False),
    (["xSTO", "P"], ["STOP", "xS"], "", True),                 # the earliest stop string wins
    ([""], ["\nUser:"], "", False),
])
def test_text_out_holds_back_only_what_may_start_a_stop_string(pieces, stops, shown, stopped):
    out, got, hit = TextOut(stops), [], False
    for p in pieces:
        s, hit = out.push(p.encode())
        got.append(s)
        if hit:
            break
    if not hit:
        got.append(out.flush())
    assert ("".join(got), hit) == (shown, stopped)


def test_text_out_keeps_a_character_split_across_tokens_whole():
    out = TextOut(["\n"])
    b = "é€".encode()
    assert [out.push(b[:1])[0], out.push(b[1:4])[0], out.push(b[4:])[0]] == ["", "é", "€"]


def _collect(engine, jobs_spec, timeout=30):
    """Submit (prompt, Params) pairs; wait; return [(text, finish_reason, n) or ("error", msg)]."""
    results = [[] for _ in jobs_spec]
    done = threading.Semaphore(0)

    def emit(i):
        def f(ev):
            results[i].append(ev)
            if ev[0] != "text":
                done.release()
        return f

    engine.submit([Job(p, params, emit(i)) for i, (p, params) in enumerate(jobs_spec)])
    for _ in jobs_spec:
        assert done.acquire(timeout=timeout)
    out = []
    for evs in results:
        end = evs[-1]
        out.append(("error", end[1]) if end[0] == "error" else ("".join(e[1] for e in evs[:-1]), end[1], end[2]))
    return out


def test_engine_batches_rows_at_different_positions_as_if_alone(ckpt):
    """Requests of different lengths joining and leaving one batch give each one's solo tokens."""
    from tinylm.generate import generate

    _, model, tok = ckpt
    prompts = [tok.encode(s) for s in ("def ", "class Point:", "return a", "self.x = x\n")]
    eng = Engine(model, tok, slots=3, queue_size=8).start()  # 3 slots, 4 requests: one joins later
    try:
        got = _collect(eng, [(p, Params(max_tokens=8 + 5 * i, temperature=0)) for i, p in enumerate(prompts)])
        sampled = _collect(eng, [(prompts[0], Params(max_tokens=20, temperature=1.0, seed=3))] * 2)
    finally:
        eng.stop()
    assert eng.stats["max_batch"] == 3 and eng.stats["prefills"] == 6
    for i, p in enumerate(prompts):
        want = generate(model, p, 8 + 5 * i, temperature=0)[len(p):]
        assert got[i] == (tok.decode(want.tolist()), "length", 8 + 5 * i)
    assert sampled[0] == sampled[1]  # a job's own rng: the same seed gives the same text in one batch


def test_engine_stops_at_a_stop_token_and_a_stop_string(ckpt):
    from tinylm.generate import generate

    _, model, tok = ckpt
    p = tok.encode("def add(a, b):")
    ids = generate(model, p, 12, temperature=0)[len(p):].tolist()
    text = tok.decode(ids)
    # a token k >= 3 used for the first time whose pair with the token before decodes to text in the whole
    k = next(i for i in range(3, 12) if ids[i] not in ids[:i] and text.find(tok.decode(ids[i - 1:i + 1])) ==
             len(tok.decode(ids[:i - 1])))
    stop_s = tok.decode(ids[k - 1:k + 1])
    eng = Engine(model, tok, slots=2, queue_size=2).start()
    try:
        by_token, by_string = _collect(eng, [(p, Params(max_tokens=12, temperature=0, stop_tokens=frozenset({ids[k]}))),
                                             (p, Params(max_tokens=12, temperature=0, stop=(stop_s,)))])
    finally:
        eng.stop()
    assert by_token == (tok.decode(ids[:k]), "stop", k + 1)  # the stop token is counted, not shown
    assert by_string[:2] == (text[:text.find(stop_s)], "stop")


def test_engine_queue_is_bounded_and_a_failing_job_fails_alone(ckpt):
    _, model, tok = ckpt
    eng = Engine(model, tok, slots=2, queue_size=1)  # not started: nothing leaves the line
    eng.submit([Job([1], Params(max_tokens=2), print)] * 3)  # 2 free slots + 1 waiting
    with pytest.raises(QueueFull):
        eng.submit([Job([1], Params(max_tokens=2), print)])
    eng = Engine(model, tok, slots=2, queue_size=4).start()
    try:  # token id 10**6 is past the vocabulary: its prefill raises inside the engine
        res = _collect(eng, [([10**6], Params(max_tokens=5)), ([1, 2], Params(max_tokens=5, temperature=0))])
        assert res[0][0] == "error" and "generation failed" in res[0][1]
        assert res[1][1:] == ("length", 5)
        assert _collect(eng, [([3], Params(max_tokens=3))])[0][1:] == ("length", 3)  # the engine lives on
    finally:
        eng.stop()


def test_chat_template_switch(ckpt):
    _, _, tok = ckpt
    plain = api.chat_template(tok, 10**6)
    assert plain.name == "plain" and plain.stop == ("\nUser:",) and plain.stop_tokens == {tok.eot_id}
    ids = plain.render([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert ids[0] == tok.eot_id and tok.decode(ids[1:]) == "System: be brief\nUser: hi\nAssistant:"
    chat = pytest.importorskip("tinylm.posttrain.chat")
    tok2 = _copy(tok)
    fmt = chat.ChatFormat(tok2)  # adds the chat tokens to this copy
    tmpl = api.chat_template(tok2, tok2.vocab_size)
    assert tmpl.name == "chat-tokens" and fmt.end_id in tmpl.stop_tokens and tmpl.stop == ()
    msgs = [{"role": "user", "content": "hi"}]
    assert tmpl.render(msgs) == fmt.render_prompt(msgs)
    assert api.chat_template(tok2, tok.vocab_size).name == "plain"  # a model without rows for them


def _copy(tok):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        tok.save(Path(d) / "t.json")
        return BPETokenizer.load(Path(d) / "t.json")


# ---- the server through the openai client ---------------------------------------------------
def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    status, h = get(server.url + "/health")
    assert status == 200 and h["status"] == "ok" and h["slots"] == 4 and h["chat_template"] == "plain"
    status, page = get(server.url + "/")
    assert status == 200 and "<title>tinylm chat</title>" in page and "/v1/chat/completions" in page


def test_completion_streamed_equals_not_streamed(client, ckpt):
    _, _, tok = ckpt
    kw = dict(model="tiny", prompt="def add(", max_tokens=20, temperature=0.9, top_p=0.95, seed=11)
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and len(full.choices) == 1
    c = full.choices[0]
    assert c.finish_reason in ("stop", "length") and c.text
    assert full.usage.prompt_tokens == len(tok.encode("def add("))
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens and not chunks[-1].choices


def test_stop_strings_streamed_and_not(client):
    kw = dict(model="tiny", prompt="class Point:", max_tokens=30, temperature=0)
    text = client.completions.create(**kw).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = text[:text.find(stop)]
    got = client.completions.create(**kw, stop=[stop, "\x00never"]).choices[0]
    assert (got.text, got.finish_reason) == (cut, "stop")
    chunks = list(client.completions.create(**kw, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_chat_streamed_equals_not_streamed(client):
    kw = dict(model="tiny", messages=[{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "hello there"},
                                      {"role": "assistant", "content": "hi"},
                                      {"role": "user", "content": [{"type": "text", "text": "and now?"}]}],
              max_tokens=24, temperature=0.8, seed=5)
    full = client.chat.completions.create(**kw)
    m = full.choices[0].message
    assert full.object == "chat.completion" and m.role == "assistant" and isinstance(m.content, str)
    assert "\nUser:" not in m.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == m.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)


def test_raw_stream_is_openai_sse_ending_in_done(server):
    req = urllib.request.Request(server.url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "tiny", "stream": True, "max_tokens": 5,
                                                  "messages": [{"role": "user", "content": "hi"}]}).encode())
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers.get_content_type() == "text/event-stream"
        events = r.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_greedy_equals_tinylm_sample(client, ckpt, capsys):
    from tinylm.cli import main

    link, _, _ = ckpt
    for prompt in ("class Point:", "    return"):
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0).choices[0].text
        capsys.readouterr()
        assert main(["sample", "--ckpt", str(link), "--prompt", prompt, "--max-new-tokens", "30",
                     "--temperature", "0"]) == 0
        assert capsys.readouterr().out == prompt + got + "\n"


def test_n_choices_and_prompt_lists(client, ckpt):
    many = client.completions.create(model="tiny", prompt="def ", n=3, max_tokens=12, temperature=1.0, seed=40)
    assert [c.index for c in many.choices] == [0, 1, 2]
    for k in range(3):  # choice k is the request with seed + k
        one = client.completions.create(model="tiny", prompt="def ", max_tokens=12, temperature=1.0, seed=40 + k)
        assert one.choices[0].text == many.choices[k].text
    tok = ckpt[2]
    both = client.completions.create(model="tiny", prompt=["def ", "class "], max_tokens=4, temperature=0)
    ids = client.completions.create(model="tiny", prompt=[tok.encode("def "), tok.encode("class ")], max_tokens=4,
                                    temperature=0)
    assert [c.index for c in both.choices] == [0, 1] and both.usage.prompt_tokens == len(tok.encode("def class "))
    assert [c.text for c in ids.choices] == [c.text for c in both.choices]


def test_concurrent_clients_are_decoded_together(server, client):
    prompts = ["def ", "class ", "self.x", "return a", "User: hi"]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=25, temperature=0).choices[0].text
             for p in prompts]
    server.engine.stats["max_batch"] = 0
    step = server.engine._step
    server.engine._step = lambda rows: (time.sleep(0.01), step(rows))  # so that the requests overlap
    got = [None] * len(prompts)

    def one(i):
        got[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=25, temperature=0,
                                           stream=i % 2 == 1)
        if i % 2:
            got[i] = "".join(ch.choices[0].text for ch in got[i])
        else:
            got[i] = got[i].choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        server.engine._step = step
    assert got == alone  # 5 requests, 4 slots: one waited, joined when a row came free
    assert server.engine.stats["max_batch"] == 4


# ---- bad input: every one a 4xx with an OpenAI error body -----------------------------------
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
COMP = {"model": "tiny", "prompt": "hi"}


@pytest.mark.parametrize("path, body, status, code", [
    ("completions", b"{not json", 400, "invalid_json"),
    ("chat/completions", b"", 400, "invalid_json"),
    ("chat/completions", [1, 2], 400, None),
    ("completions", dict(COMP, bogus=1), 400, "unknown_parameter"),
    ("chat/completions", dict(CHAT, max_tokens="10"), 400, "invalid_type"),
    ("chat/completions", dict(CHAT, temperature="hot"), 400, "invalid_type"),
    ("chat/completions", dict(CHAT, stream="yes"), 400, "invalid_type"),
    ("chat/completions", dict(CHAT, n=True), 400, "invalid_type"),
    ("chat/completions", dict(CHAT, messages="hi"), 400, "invalid_type"),
    ("chat/completions", dict(CHAT, messages=[{"role": "robot", "content": "hi"}]), 400, "invalid_value"),
    ("chat/completions", dict(CHAT, messages=[{"role": "user", "content": 3}]), 400, "invalid_type"),
    ("completions", dict(COMP, prompt=5), 400, "invalid_type"),
    ("completions", dict(COMP, prompt=[1, 10**7]), 400, "invalid_value"),
    ("completions", {"model": "tiny"}, 400, "missing_required_parameter"),
    ("completions", {"prompt": "hi"}, 400, "missing_required_parameter"),
    ("completions", dict(COMP, max_tokens=0), 400, "invalid_value"),
    ("completions", dict(COMP, max_tokens=-3), 400, "invalid_value"),
    ("completions", dict(COMP, max_tokens=BLOCK + 1), 400, "invalid_value"),
    ("completions", dict(COMP, temperature=2.5), 400, "invalid_value"),
    ("completions", dict(COMP, top_p=0), 400, "invalid_value"),
    ("completions", dict(COMP, top_k=0), 400, "invalid_value"),
    ("completions", dict(COMP, stop=["a", "b", "c", "d", "e"]), 400, "invalid_type"),
    ("completions", dict(COMP, prompt=[7] * BLOCK), 400, "context_length_exceeded"),
    ("chat/completions", dict(CHAT, messages=[{"role": "user", "content": "word " * 400}]), 400,
     "context_length_exceeded"),
    ("completions", dict(COMP, n=5), 400, "invalid_value"),                 # more than the 4 slots
    ("completions", dict(COMP, prompt=["a", "b", "c"], n=2), 400, "invalid_value"),
    ("completions", dict(COMP, logprobs=3), 400, "unsupported_value"),
    ("completions", dict(COMP, stream_options={"include_usage": True}), 400, "invalid_value"),
    ("completions", dict(COMP, model="gpt-4"), 404, "model_not_found"),
])
def test_bad_input_gets_a_4xx_with_an_openai_error(server, path, body, status, code):
    raw = body if isinstance(body, bytes) else None
    got, err = post(f"{server.url}/v1/{path}", body, raw=raw)
    assert got == status, err
    assert set(err) == {"error"} and isinstance(err["error"]["message"], str) and err["error"]["message"]
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["code"] == code


def test_bad_input_through_the_client_and_unknown_routes(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=0)
    assert e.value.status_code == 400 and "max_tokens" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert get(server.url + "/v2/nothing")[0] == 404
    status, err = get(server.url + "/v1/completions")  # GET on a POST route
    assert status == 405 and "error" in err
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # a body too large to read
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n{")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    assert get(server.url + "/health")[1]["status"] == "ok"  # none of it hurt the server


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    body = json.dumps({"model": "tiny", "prompt": "def ", "max_tokens": BLOCK - 2, "stream": True,
                       "temperature": 1.0}).encode()
    cancelled = server.engine.stats["cancelled"]
    orig = server.engine._step

    def slow_step(rows):  # ~60 steps of 20 ms: the stream is still running when the client leaves
        time.sleep(0.02)
        orig(rows)

    server.engine._step = slow_step
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            got = b""
            while got.count(b"data: ") < 3:
                got += s.recv(4096)
            assert get(server.url + "/health")[1]["busy"] == 1
        deadline = time.monotonic() + 10
        while get(server.url + "/health")[1]["busy"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert get(server.url + "/health")[1]["busy"] == 0
        assert server.engine.stats["cancelled"] == cancelled + 1
    finally:
        server.engine._step = orig


def test_a_full_queue_is_a_503_and_the_others_finish(ckpt):
    _, model, tok = ckpt
    engine = Engine(model, tok, slots=1, queue_size=1)
    orig = engine._step
    engine._step = lambda rows: (time.sleep(0.01), orig(rows))
    with Running(create_app(engine, tok, model_name="tiny")) as srv:
        results = {}

        def run(i):
            results[i] = post(srv.url + "/v1/completions", dict(COMP, max_tokens=40, temperature=0))

        first = threading.Thread(target=run, args=(0,))
        first.start()
        while get(srv.url + "/health")[1]["busy"] == 0:
            time.sleep(0.01)
        second = threading.Thread(target=run, args=(1,))
        second.start()
        while get(srv.url + "/health")[1]["waiting"] == 0 and get(srv.url + "/health")[1]["busy"]:
            time.sleep(0.005)
        status, err = post(srv.url + "/v1/completions", COMP)
        first.join(30)
        second.join(30)
    assert status == 503 and err["error"]["code"] == "server_busy"
    assert results[0][0] == results[1][0] == 200 and results[0][1]["choices"][0]["text"] == \
        results[1][1]["choices"][0]["text"]


def test_api_key_is_checked_on_every_request(ckpt):
    _, model, tok = ckpt
    app = create_app(Engine(model, tok, slots=1, queue_size=1), tok, model_name="tiny", api_key="sekret")
    with Running(app) as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert e.value.status_code == 401
        assert post(srv.url + "/v1/chat/completions", CHAT)[0] == 401       # no key at all
        assert get(srv.url + "/health")[0] == 401
        assert get(srv.url + "/v1/models")[0] == 401
        assert get(srv.url + "/")[0] == 200                                  # the page itself holds nothing
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        assert get(srv.url + "/health", {"Authorization": "Bearer sekret"})[0] == 200


@pytest.mark.slow
def test_the_serve_command(ckpt, tmp_path):
    """``tinylm serve`` on port 0 prints its address, answers, and stops cleanly on Ctrl-C."""
    import os
    import signal

    link, _, _ = ckpt
    env = dict(os.environ, TINYLM_API_KEY="k2")
    proc = subprocess.Popen([sys.executable, "-m", "tinylm", "serve", "--ckpt", str(link), "--port", "0",
                             "--model-name", "tiny", "--slots", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line and "API key required" in line, proc.stderr.read()
        url = line.split(" on ")[1].split()[0]
        c = openai.OpenAI(base_url=url + "/v1", api_key="k2", max_retries=0)
        assert c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=3).choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    r = subprocess.run([sys.executable, "-m", "tinylm", "serve", "--ckpt", str(tmp_path / "none")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "none" in r.stderr
