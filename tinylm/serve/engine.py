"""The engine: one background thread that decodes every running request together.

Requests become slots (llama.cpp's server slots). The engine owns one KV cache of ``slots``
rows; each iteration of its loop

    1. drops the slots whose client has gone (``Job.cancel``),
    2. admits waiting jobs into free rows: each prompt is prefilled alone into its row
       (``model(prompt, cache=cache.row(r), start=0)``) and its first token sampled,
    3. runs one batched decode step for every busy row at once: the rows' last tokens (S, 1),
       each at its own position (``start`` one int per row), and samples each row's next token
       with that request's own random generator,

so requests join and leave between steps, and a request's tokens do not depend on what else
is in the batch (its rng is seeded by its own seed; the logits of a row are those it would get
alone, up to float rounding). Only rows ``0 .. highest busy row`` are stepped, and free rows
are taken lowest first, so a lone request runs at batch 1.

Nothing here knows HTTP. A job reports through its ``emit`` callback, called on the engine
thread with one of

    ("text", piece)                        decoded text (UTF-8 safe, never past a stop string)
    ("end", finish_reason, n_tokens)       "stop" (a stop token or string) or "length"
    ("error", message)                     this job failed; the engine carries on

The waiting line is bounded: ``submit`` raises ``QueueFull`` instead of queueing past
``queue_size`` (the server answers 503). An exception inside a step fails only the jobs in
that step; the loop itself never dies of one.

Leaves out: batched prefill (a long prompt delays the other rows' next token by its prefill),
prefix caching, speculative decoding, priorities; a request longer than the context is the
caller's to refuse (``Engine.room``).
"""
from __future__ import annotations

import codecs
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tinylm.backend import to_device
from tinylm.generate import check_sampling, sample
from tinylm.models.cache import KVCache
from tinylm.tensor import no_grad


class QueueFull(RuntimeError):
    """The waiting line is full: try again later."""


@dataclass
class Params:
    """What one generation may do: its length, its sampling and where it stops."""
    max_tokens: int                         # tokens to sample at most (a stop token counts)
    temperature: float = 1.0                # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None                 # seeds this job's own random generator
    stop: tuple[str, ...] = ()              # stop strings: the text ends before the first one
    stop_tokens: frozenset = field(default_factory=frozenset)  # ids that end the text (not shown)

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


class Job:
    """One prompt to continue. ``emit(event)`` is called on the engine thread."""

    def __init__(self, prompt_ids, params: Params, emit):
        self.prompt_ids = [int(t) for t in prompt_ids]
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")
        self.params = params
        self.emit = emit
        self.cancelled = False  # set by the request side; read by the engine between steps
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        """The client has gone: the engine frees this job's slot before its next step."""
        self.cancelled = True


class TextOut:
    """Token bytes -> text pieces, UTF-8 safe, ending before the first stop string.

    Text that could still be the start of a stop string is held back until it is not:
    with stop ``"\\nUser:"``, pushing ``"hi\\nUs"`` gives ``"hi"`` (``"\\nUs"`` held); then ``"e"``
    gives ``""``; then ``"r:"`` stops with nothing more shown.
    """

    def __init__(self, stops=()):
        self.stops = tuple(s for s in stops if s)
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""

    def _cut(self, s: str, final: bool) -> tuple[str, bool]:
        hits = [i for i in (s.find(t) for t in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return s[:min(hits)], True
        keep = 0
        if not final:  # the longest tail of s that begins some stop string
            for t in self.stops:
                for k in range(min(len(t) - 1, len(s)), keep, -1):
                    if s.endswith(t[:k]):
                        keep = k
                        break
        self.held = s[len(s) - keep:] if keep else ""
        return s[:len(s) - keep], False

    def push(self, b: bytes) -> tuple[str, bool]:
        """(text that is now safe to show, whether a stop string was reached)."""
        return self._cut(self.held + self.dec.decode(b), final=False)

    def flush(self) -> str:
        """The held-back text at the end (nothing past a stop string)."""
        return self._cut(self.held + self.dec.decode(b"", final=True), final=True)[0]


class _Slot:
    def __init__(self, job: Job):
        self.job = job
        p = job.params
        self.rng = np.random.default_rng(p.seed)
        self.text = TextOut(p.stop)
        self.pos = 0      # positions of this row's cache that are filled
        self.last = 0     # the token to feed next
        self.n = 0        # tokens sampled
        self.done = False


class _RowRngs:
    """Stands in for one rng in ``sample``: row i's uniform comes from generator i."""

    def __init__(self, rngs):
        self.rngs = rngs

    def random(self, shape):  # (rows, 1)
        return np.array([[g.random()] for g in self.rngs]).reshape(shape)


def _rows(cache: KVCache, n: int) -> KVCache:
    """A cache of the first n rows of ``cache`` whose arrays are views (like ``cache.row``)."""
    view = KVCache.__new__(KVCache)
    view.k = [K[:n] for K in cache.k]
    view.v = [V[:n] for V in cache.v]
    view.max_len, view.batch, view.pos = cache.max_len, n, 0
    return view


class Engine:
    """``Engine(model, tokenizer, slots, queue_size).start()``; ``submit([job, ...])``; ``stop()``."""

    def __init__(self, model, tokenizer, slots: int = 8, queue_size: int = 32, threads: int | None = None):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.model, self.tok = model.eval(), tokenizer
        self.block_size = model.config.block_size
        self.n_slots, self.queue_size = slots, queue_size
        self.threads = threads  # kernel threads (None: the process's setting, TINYLM_NUM_THREADS)
        self.cache = model.new_cache(slots)
        self.slots: list[_Slot | None] = [None] * slots
        self.waiting: deque[Job] = deque()
        self.cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = {"steps": 0, "prefills": 0, "tokens": 0, "max_batch": 0, "errors": 0, "cancelled": 0}

    # ---- the request side (any thread) -------------------------------------------------------
    def room(self, n_prompt: int) -> int:
        """How many tokens a prompt of n_prompt tokens may still get: prompt + completion fit
        in the context (OpenAI's rule)."""
        return self.block_size - n_prompt

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of ``jobs`` or none: QueueFull when the line would pass ``queue_size``
        beyond the free slots."""
        with self.cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free = sum(s is None for s in self.slots)
            if len(self.waiting) + len(jobs) > self.queue_size + free:
                raise QueueFull(f"the server is busy ({self.n_slots} slots running, {len(self.waiting)} waiting); "
                                f"retry later")
            self.waiting.extend(jobs)
            self.cv.notify()

    def load(self) -> dict:
        with self.cv:
            busy = sum(s is not None for s in self.slots)
            return {"slots": self.n_slots, "busy": busy, "waiting": len(self.waiting), "queue_size": self.queue_size}

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="tinylm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self.cv:
            self._stopping = True
            self.cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        from kernels._threads import get_num_threads, set_num_threads  # noqa: PLC0415

        set_num_threads(self.threads or get_num_threads())  # Numba's thread count is per thread: set it here
        while True:
            with self.cv:
                while not self._stopping and not self.waiting and all(s is None for s in self.slots):
                    self.cv.wait()
                if self._stopping:
                    break
                for r, s in enumerate(self.slots):  # clients that left: free their rows
                    if s is not None and s.job.cancelled:
                        self.slots[r] = None
                        self.stats["cancelled"] += 1
                admit = []
                for r in range(self.n_slots):
                    while self.slots[r] is None and self.waiting:
                        job = self.waiting.popleft()
                        if job.cancelled:
                            self.stats["cancelled"] += 1
                            continue
                        self.slots[r] = _Slot(job)
                        admit.append(r)
            for r in admit:
                self._guard([r], self._prefill, r)
            rows = [r for r, s in enumerate(self.slots) if s is not None and not s.done]
            if rows:
                self._guard(rows, self._step, rows)
        self._shutdown()

    def _guard(self, rows, fn, *args) -> None:
        """Run one prefill or step; if it raises, fail the jobs of those rows, keep the loop."""
        try:
            with no_grad():
                fn(*args)
        except Exception as e:  # noqa: BLE001 (one request must never take the server down)
            self.stats["errors"] += 1
            for r in rows:
                s = self.slots[r]
                if s is not None and not s.done:
                    self._send(s, ("error", f"generation failed: {type(e).__name__}: {e}"))
                    self._free(r)

    def _logits(self, ids: np.ndarray, cache, start) -> np.ndarray:
        logits, _ = self.model(self.model._dev(ids), cache=cache, start=start)
        return to_device(logits.values()[:, -1], "cpu")  # (B, V)

    def _prefill(self, r: int) -> None:
        s = self.slots[r]
        ids = np.asarray(s.job.prompt_ids, dtype=np.int64)[None]
        logits = self._logits(ids, self.cache.row(r), 0)
        s.pos = ids.shape[1]
        self.stats["prefills"] += 1
        self._take(r, int(self._sample(logits, [r])[0]))

    def _step(self, rows: list[int]) -> None:
        n = max(rows) + 1
        toks = np.zeros((n, 1), dtype=np.int64)  # idle rows below n: token 0 at position 0
        start = np.zeros(n, dtype=np.int64)
        for r in rows:
            toks[r, 0], start[r] = self.slots[r].last, self.slots[r].pos
        # one shared position (a lone request, or rows in step) takes the plain path, which is
        # what tinylm.generate runs: greedy output then equals `tinylm sample` bit for bit
        same = n == len(rows) and (start == start[0]).all()
        logits = self._logits(toks, _rows(self.cache, n), int(start[0]) if same else start)
        self.stats["steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(rows))
        groups: dict[tuple, list[int]] = {}  # rows with the same sampling settings are sampled in one call
        for r in rows:
            self.slots[r].pos += 1
            p = self.slots[r].job.params
            groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(r)
        for rs in groups.values():
            for r, t in zip(rs, self._sample(logits[rs], rs)):
                self._take(r, int(t))

    def _sample(self, logits: np.ndarray, rows: list[int]) -> np.ndarray:
        """One token per row of logits (len(rows), V), each row drawn with its own job's rng.
        The same numbers as sampling each row alone: every operation in ``sample`` works row by
        row, and it draws one uniform per row, which _RowRngs takes from that row's generator."""
        p = self.slots[rows[0]].job.params
        return sample(logits, p.temperature, p.top_k, p.top_p, _RowRngs([self.slots[r].rng for r in rows]))

    def _take(self, r: int, t: int) -> None:
        """Row r sampled token t: emit its text; finish the job if it is done."""
        s = self.slots[r]
        p = s.job.params
        s.n += 1
        self.stats["tokens"] += 1
        if t in p.stop_tokens:
            return self._finish(r, "stop")
        piece, stopped = s.text.push(self.tok.decode_bytes([t]))
        if piece:
            self._send(s, ("text", piece))
        if stopped:
            return self._finish(r, "stop", flush=False)
        if s.n >= p.max_tokens or s.pos >= self.block_size:
            return self._finish(r, "length")
        s.last = t

    def _finish(self, r: int, reason: str, flush: bool = True) -> None:
        s = self.slots[r]
        if flush:
            tail = s.text.flush()
            if tail:
                self._send(s, ("text", tail))
        self._send(s, ("end", reason, s.n))
        self._free(r)

    def _free(self, r: int) -> None:
        with self.cv:
            s = self.slots[r]
            if s is not None:
                s.done = True
            self.slots[r] = None

    def _send(self, s: _Slot, event) -> None:
        try:
            s.job.emit(event)
        except Exception:  # noqa: BLE001 (the client's event loop is gone: drop the job)
            s.job.cancel()

    def _shutdown(self) -> None:
        with self.cv:
            left = [s.job for s in self.slots if s is not None] + list(self.waiting)
            self.slots = [None] * self.n_slots
            self.waiting.clear()
        for job in left:
            try:
                job.emit(("error", "the server is shutting down"))
            except Exception:  # noqa: BLE001
                pass
