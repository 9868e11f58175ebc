"""The engine in this process (`EngineDriver`, an `EngineClient`): the one thread that runs
`engine.step()`, and the delivery of each step's deltas to the asyncio queues of the HTTP requests
that own them (`loop.call_soon_threadsafe`). Model work never runs on the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ..engine.config import ModelInfo
from ..sampling import SamplingParams
from .client import EngineStats
from .metrics import Metrics
from .settings import WARMUP_NOTICE

log = logging.getLogger("mistral7b.server")


@dataclass
class Item:
    """What one engine step produced for one choice, as delivered to the event loop."""

    choice: int
    text: str
    token_ids: list[int]
    logprobs: list | None  # TokenLogprob entries of these tokens
    finish_reason: str | None
    error: str | None = None


@dataclass
class Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    choice: int
    metrics: Metrics
    sent_tokens: int = 0
    last_time: float | None = None


class EngineDriver:
    """An `EngineClient` over an `LLM`'s engine: the one thread that runs `engine.step()`; everything
    else talks to it through this object.

    `submit` adds requests (any thread), `abort` queues an abort that the thread applies before its next
    step, so an aborted request's row is free for that step. One driver per engine: apps built on the
    same engine share it (two threads must never step one engine).
    """

    dead = None  # an engine in this process dies with it

    def __init__(self, llm):
        """`llm`: an `LLM`, or anything with its `engine`, `tokenizer`, `source`, `encode_prompt` and
        `chat_prompt`; its engine now is the one driven."""
        self.engine = llm.engine
        self.name, self.tokenizer, self.adapters = llm.source, llm.tokenizer, self.engine.adapters
        self.model_info = ModelInfo.of(self.engine)
        # The LLM renders prompts; the engine validates requests and loads adapters itself.
        self.encode_prompt, self.chat_prompt = llm.encode_prompt, llm.chat_prompt
        self.validate, self.load_lora = self.engine.validate, self.engine.load_lora
        self.on_death: list = []
        self.subscribers: dict[str, Subscriber] = {}
        self.requests: dict[str, Any] = {}
        self._aborts: list = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.warmed = threading.Event()
        self.steps = 0
        self.aborted = 0

    def _start_thread(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("this engine driver is closed")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mistral7b-engine", daemon=True)
                self._thread.start()

    def start(self) -> "EngineDriver":
        """Start the thread and wait until it has warmed the engine up (compiled it, if it compiles)."""
        if self.engine.compiled and not self.warmed.is_set():
            log.warning(WARMUP_NOTICE)
        self._start_thread()
        self.warmed.wait()
        return self

    def close(self) -> None:
        """Stop the thread for good once it is idle."""
        self._closed = True
        self._wake.set()

    def unavailable(self) -> str | None:
        return None

    def stats(self) -> EngineStats:
        engine = self.engine
        prefix, spec = engine.prefix, engine.speculator
        return EngineStats(engine.n_running, engine.n_waiting, self.steps, self.aborted,
                           prefix.metrics() if prefix is not None else None, spec.stats if spec is not None else None)

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str, sub: Subscriber, lora=None):
        self._start_thread()
        with self._lock:
            self.subscribers[request_id] = sub
        try:
            request = self.engine.add(prompt_ids, params, request_id, lora=lora)
        except BaseException:
            with self._lock:
                self.subscribers.pop(request_id, None)
            raise
        with self._lock:
            self.requests[request_id] = request
        sub.metrics.prompt_tokens.inc(len(prompt_ids))
        self._wake.set()
        return request

    def abort(self, request) -> None:
        with self._lock:
            self.subscribers.pop(request.id, None)
            self.requests.pop(request.id, None)
            if not request.finished and not any(r is request for r in self._aborts):
                self._aborts.append(request)
        self._wake.set()

    def pending_aborts(self) -> int:
        """Aborted requests the engine thread has not dropped yet (it does before its next step): they
        still count as running or waiting in the engine, but admission must see their rows as free."""
        with self._lock:
            return sum(not r.finished for r in self._aborts)

    def _apply_aborts(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, []
        for request in aborts:
            if request.finished:
                continue  # finished meanwhile, or queued twice
            self.engine.abort(request)
            if request.finish_reason == "abort":
                self.aborted += 1

    def _run(self) -> None:
        # CUDA graphs that torch.compile records belong to the thread that recorded the first of them,
        # so a compiled engine is warmed up here, on the one thread that will ever step it.
        if self.engine.compiled:
            try:
                self.engine.warmup()
            except Exception:
                log.exception("engine warm-up failed")
        self.warmed.set()
        while not self._closed:
            self._wake.clear()
            self._apply_aborts()
            if not self.engine.has_work():
                self._wake.wait()
                continue
            try:
                deltas = self.engine.step()
            except Exception as e:  # the model failed: fail every request in flight, keep the thread alive
                log.exception("engine step failed")
                self._fail_all(f"the engine failed: {type(e).__name__}")
                continue
            self.steps += 1
            self._dispatch(deltas)

    def _dispatch(self, deltas) -> None:
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        with self._lock:
            for d in deltas:
                request = d.request
                sub = self.subscribers.get(request.id)
                if sub is None:
                    continue
                k = len(d.token_ids)
                lps = None
                if request.logprobs is not None:
                    lps = request.logprobs[sub.sent_tokens : sub.sent_tokens + k]
                sub.sent_tokens += k
                sub.metrics.record_tokens(request, k, now, sub.last_time, d.finish_reason)
                sub.last_time = now
                item = Item(sub.choice, d.text, list(d.token_ids), lps, d.finish_reason)
                if d.finished:
                    self.subscribers.pop(request.id, None)
                    self.requests.pop(request.id, None)
                by_loop[sub.loop].append((sub.queue, item))
        for loop, items in by_loop.items():
            deliver_soon(loop, items)

    def _fail_all(self, message: str) -> None:
        """On the engine thread: abort every request in flight and fail its subscriber."""
        with self._lock:
            subs, self.subscribers = list(self.subscribers.values()), {}
            requests, self.requests = self.requests, {}
        for request in requests.values():
            self.engine.abort(request)
        deliver_errors(subs, message)

    def fail_open(self, message: str) -> None:
        """From any thread (a shutdown ending what is left): fail every open request's subscriber now;
        the engine thread drops the requests before its next step."""
        with self._lock:
            subs, self.subscribers = list(self.subscribers.values()), {}
            requests, self.requests = self.requests, {}
            self._aborts += [r for r in requests.values() if not r.finished]
        self._wake.set()
        deliver_errors(subs, message)


def deliver_errors(subs, message: str) -> None:
    """Send each subscriber an error item: its request ends with `message` (streams: an error event)."""
    by_loop: dict = defaultdict(list)
    for sub in subs:
        by_loop[sub.loop].append((sub.queue, Item(sub.choice, "", [], None, None, error=message)))
    for loop, items in by_loop.items():
        deliver_soon(loop, items)


def deliver_soon(loop, items) -> None:
    def put():
        for queue, item in items:
            queue.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass
