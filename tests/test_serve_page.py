"""The chat page in a real headless Chromium, driven over the DevTools protocol.

Chromium's ``--remote-debugging-pipe`` speaks the DevTools protocol (JSON messages ended by a
NUL byte) on file descriptors 3 and 4, so the test needs no driver package and no websocket:
``Browser`` below is the whole client. The test types a message and clicks Send as a person
would (``Input.insertText``, mouse events at the button), watches the reply grow while it
streams, checks it equals the API's own answer for the same settings, sends a second turn,
stops a long reply with the Stop button, and saves a screenshot (``chat.png`` under the test's
tmp_path; set ``TINYLM_SCREENSHOT`` to a file path to keep a copy, ``TINYLM_CHROMIUM_LOG`` to
keep Chromium's own messages).

Skipped when no Chromium is installed (Debian: ``apt-get install -y chromium``).
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from test_serve import TEXT, tiny_model  # noqa: E402 (tests/ is on sys.path under pytest)

from tinylm.serve.app import Running, create_app  # noqa: E402
from tinylm.serve.engine import Engine  # noqa: E402
from tinylm.tokenizer import BPETokenizer  # noqa: E402

CHROMIUM = os.environ.get("TINYLM_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed")]


class Browser:
    """Headless Chromium and one page, over the DevTools protocol on a pipe."""

    def __init__(self, exe: str, profile_dir, width: int = 1100, height: int = 720):
        self._to_r, self._to_w = os.pipe()      # we write, Chromium reads (its fd 3)
        self._from_r, self._from_w = os.pipe()  # Chromium writes (its fd 4), we read
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--remote-debugging-pipe", f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"]
        # bash, not sh: dash takes only one-digit descriptors in a redirection
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$@" 3<&{self._to_r} 4>&{self._from_w}', "bash", *args],
                                     pass_fds=(self._to_r, self._from_w), stdout=subprocess.DEVNULL,
                                     stderr=open(os.environ.get("TINYLM_CHROMIUM_LOG", os.devnull), "w"))
        os.close(self._to_r)
        os.close(self._from_w)
        self._buf, self._id, self.session = b"", 0, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, timeout: float = 30.0, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_r], [], [], left)[0]:
                raise TimeoutError(f"{method}: no answer from Chromium in {timeout} s")
            chunk = os.read(self._from_r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self._buf += chunk

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # the page may not be there yet (navigating): an error counts as false
            v = self.js(f"(() => {{ try {{ return {expr}; }} catch (e) {{ return null; }} }})()")
            if v:
                return v
            time.sleep(0.02)
        raise TimeoutError(f"never true: {expr}")

    def click(self, selector: str) -> None:
        x, y = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                       f" return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def screenshot(self, path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._to_w)
        os.close(self._from_r)


LAST = "document.querySelectorAll('.msg.assistant')[document.querySelectorAll('.msg.assistant').length - 1]"


def test_the_chat_page_streams_a_reply_in_a_real_browser(tmp_path):
    import openai

    tok = BPETokenizer().train(TEXT, 300, progress=False)
    engine = Engine(tiny_model(tok.vocab_size, block=256), tok, slots=2, queue_size=2)
    step = engine._step
    engine._step = lambda rows: (time.sleep(0.02), step(rows))  # 20 ms more a token: slow enough to watch
    with Running(create_app(engine, tok, model_name="tiny")) as srv:
        b = Browser(CHROMIUM, tmp_path / "profile")
        try:
            b.call("Page.navigate", url=f"{srv.url}/?temperature=0&max_tokens=30&top_k=")
            b.wait("document.getElementById('status').textContent === 'model: tiny'")
            b.type("#input", "hello there")
            b.click("#send")
            seen = set()
            while not b.js(f"{LAST} && {LAST}.dataset.done === '1'"):
                seen.add(b.js(f"{LAST} ? {LAST}.querySelector('.text').textContent : ''"))
                time.sleep(0.01)
            reply = b.js(f"{LAST}.querySelector('.text').textContent")
            chunks = int(b.js(f"{LAST}.dataset.chunks"))
            assert reply and chunks > 1
            assert len({s for s in seen if s and s != reply}) >= 2, "the reply did not appear piece by piece"
            api = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
            want = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                               temperature=0, top_p=1, max_tokens=30)
            assert reply == want.choices[0].message.content  # the page shows what the API says
            assert "finish: " in b.js(f"{LAST}.querySelector('.meta').textContent")

            b.type("#input", "and a second question")  # a second turn: the whole conversation goes back
            b.click("#send")
            b.wait(f"document.querySelectorAll('.msg.assistant').length === 2 && {LAST}.dataset.done === '1'")
            roles = b.js("[...document.querySelectorAll('.msg')].map(m => m.classList[1])")
            assert roles == ["user", "assistant", "user", "assistant"]
            second = b.js(f"{LAST}.querySelector('.text').textContent")
            history = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": reply},
                       {"role": "user", "content": "and a second question"}]
            assert second == api.chat.completions.create(model="tiny", messages=history, temperature=0, top_p=1,
                                                         max_tokens=30).choices[0].message.content
            b.screenshot(tmp_path / "chat.png")
            if os.environ.get("TINYLM_SCREENSHOT"):
                shutil.copy(tmp_path / "chat.png", os.environ["TINYLM_SCREENSHOT"])

            b.js("document.getElementById('max_tokens').value = '60'")  # a long reply, stopped mid-way
            b.js("document.getElementById('temperature').value = '1'; document.getElementById('seed').value = '7'")
            b.type("#input", "tell me more")
            b.click("#send")
            b.wait(f"document.querySelectorAll('.msg.assistant').length === 3 && Number({LAST}.dataset.chunks) >= 2")
            assert b.js("document.getElementById('stop').disabled") is False
            b.click("#stop")
            b.wait(f"{LAST}.dataset.done === '1'")
            assert "finish: stopped" in b.js(f"{LAST}.querySelector('.meta').textContent")
            deadline = time.monotonic() + 10
            while engine.load()["busy"] and time.monotonic() < deadline:  # the server let the slot go
                time.sleep(0.02)
            assert engine.load()["busy"] == 0 and engine.stats["cancelled"] >= 1
        finally:
            b.close()
