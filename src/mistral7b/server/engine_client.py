"""The HTTP side of an engine in its own process (vLLM's EngineCoreClient): `EngineProcessClient` is an
`EngineClient` (client.py), as the in-process `EngineDriver` is, so the app runs unchanged over either.

The HTTP process tokenises prompts and renders templates (as with an in-process engine), then
detokenises the token ids each engine step sends back and applies stop strings, with the same
`engine.output` code the in-process engine runs; a stop string ends the request here and an abort
goes to the engine. The event loop never sends or waits on the connection: one thread writes to it
and one reads it, so neither process can block the other for long, nor both each other.

If the engine process dies, every open request fails at once with an OpenAI-shaped error, the app
answers 503 (`unavailable`), and the callbacks in `on_death` run (`serve` exits non-zero). One that
hangs (no message for `step_timeout` seconds while requests are open) is killed, and the same follows.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import queue
import threading
import time
from collections import defaultdict

from ..engine.config import ModelInfo
from ..engine.constraints import ConstraintManager
from ..engine.core import validate_request
from ..engine.output import OutputProcessor
from ..engine.request import Request
from ..engine.speculative import SpecStats
from ..llm import LLM, tokenizer_path
from ..tokenizer import Tokenizer
from . import engine_process, wire
from .client import EngineStats
from .driver import Item, Subscriber, deliver_errors, deliver_soon
from .engine_process import EngineLoad
from .errors import APIError
from .remote_adapters import RemoteAdapters
from .settings import DEFAULT_ENGINE_STEP_TIMEOUT

log = logging.getLogger("mistral7b.server")


class EngineProcessClient:
    """Starts the engine process and talks to it; the prompts are rendered here, with the tokenizer."""

    encode_prompt = LLM.encode_prompt  # they use only the tokenizer
    chat_prompt = LLM.chat_prompt

    def __init__(self, load: EngineLoad, tokenizer=None, name: str | None = None,
                 step_timeout: float | None = DEFAULT_ENGINE_STEP_TIMEOUT):
        """`name`: the served model's default name (`load.source` if not given); `step_timeout`: seconds
        without a message, while requests are open, after which the engine process is taken as hung and
        killed (None or 0: never)."""
        self.load, self.tokenizer, self.output = load, tokenizer, OutputProcessor(tokenizer)
        self.name = name or load.source
        self.step_timeout = step_timeout or None
        self._heard = time.monotonic()  # the last message, or when the first open request came
        self._hung = False
        self.model_info: ModelInfo | None = None  # the engine process's, when it is ready
        self.constraints = self.prefix = self.spec = None  # set when ready; prefix, spec: the last step's counters
        self.subscribers: dict[str, Subscriber] = {}
        self.requests: dict[str, Request] = {}  # open requests, by id
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.warmed = threading.Event()  # set when the engine is ready (or dead)
        self.steps = self.aborted = 0
        self.dead: str | None = None  # why the engine process is gone
        self.on_death: list = []
        self.process = self.conn = None
        self._closing = False
        self.adapters = RemoteAdapters(self._outbox.put)  # the engine process's LoRA adapters

    @classmethod
    def launch(cls, load: EngineLoad, name: str | None = None,
               step_timeout: float | None = DEFAULT_ENGINE_STEP_TIMEOUT) -> "EngineProcessClient":
        """Load the tokenizer here (none for a `load.factory` model, whose prompts are token ids), then
        start the engine process, which loads the model."""
        if load.source is None and load.factory is None:
            from ..default_model import default_model_path

            load.source = str(default_model_path())
        tokenizer = Tokenizer.from_source(tokenizer_path(load.source)) if load.factory is None else None
        return cls(load, tokenizer, name, step_timeout).start()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "EngineProcessClient":
        """Start the engine process (once); it reports ready when it has loaded the model."""
        if self.process is not None:
            return self
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot fork
        self.conn, child = ctx.Pipe()
        # A daemonic process may not start processes, and a tensor-parallel engine starts its ranks; it
        # needs no daemon flag to end with this one: it stops at `close` or at the pipe's EOF.
        self.process = ctx.Process(target=engine_process.main, args=(child, self.load.to_json()),
                                   name="mistral7b-engine", daemon=self.load.tensor_parallel_size == 1)
        self.process.start()
        # Before multiprocessing's own exit hook, which would wait forever for a process ignoring SIGTERM.
        atexit.register(self.close)
        child.close()  # else its EOF would never reach us when the process dies
        threading.Thread(target=self._read, name="mistral7b-engine-reader", daemon=True).start()
        threading.Thread(target=self._write, name="mistral7b-engine-writer", daemon=True).start()
        if self.step_timeout is not None:
            threading.Thread(target=self._watch, name="mistral7b-engine-watchdog", daemon=True).start()
        return self

    def _ready(self, reported: dict) -> None:
        self.model_info = info = ModelInfo(**reported)
        self.constraints = ConstraintManager(self.tokenizer, info.vocab_size, info.max_batch, None)
        self.prefix = {} if info.prefix_cache else None
        self.spec = SpecStats(info.speculative_tokens) if info.speculative_tokens is not None else None

    def _watch(self) -> None:
        """Kill an engine process that has gone silent with requests open; the reader then sees its EOF
        and fails them (`_died`)."""
        while not (self.dead or self._closing):
            time.sleep(min(1.0, self.step_timeout / 4))
            if self.warmed.is_set() and self.requests and time.monotonic() - self._heard > self.step_timeout:
                self._hung = True
                log.error("the engine process sent nothing for %g s with %d requests open: killing it",
                          self.step_timeout, len(self.requests))
                self.process.kill()
                return

    def warm_up(self, timeout: float | None = None) -> "EngineProcessClient":
        """Start the engine process and wait until it has loaded (and compiled) the model."""
        self.start()
        if not self.warmed.wait(timeout) or self.dead:
            raise RuntimeError(self.dead or "the engine process did not become ready in time")
        return self

    def unavailable(self) -> str | None:
        """Why the app cannot serve generation now (starting, or dead), or None."""
        if self.dead:
            return self.dead
        return None if self.warmed.is_set() else "The engine is starting (loading the model): retry shortly."

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine process. (Closing our end would not do: the reader thread blocked in recv keeps
        the socket open, so the engine would never see its EOF.)"""
        if self._closing:
            return
        self._closing = True
        atexit.unregister(self.close)
        self.adapters.died("The server is shutting down.")  # no answer will come to a load under way
        self._outbox.put(wire.STOP)
        self._outbox.put(None)
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout)

    # -- the driver's interface --------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params) -> None:
        info = self.model_info
        validate_request(prompt_ids, params, info.vocab_size, info.max_positions, self.constraints)

    def stats(self) -> EngineStats:
        """The queue, counted here from the requests this process has open, and the last step's counters."""
        n_open, rows = len(self.requests), self.model_info.max_batch if self.model_info is not None else 0
        running = min(n_open, rows)
        return EngineStats(running, n_open - running, self.steps, self.aborted, self.prefix, self.spec)

    def load_lora(self, name: str, path) -> None:
        """Load a PEFT adapter in the engine process (a round trip: `remote_adapters`)."""
        self.adapters.load(name, path)

    def submit(self, prompt_ids: list[int], params, request_id: str, sub: Subscriber, lora=None) -> Request:
        """`lora`: a loaded adapter's name; the engine process looks it up."""
        request = Request(list(prompt_ids), params, request_id)
        self.output.prepare(request)
        with self._lock:
            if self.dead:
                raise APIError(503, self.dead, type="server_error", code="engine_dead")
            if not self.requests:  # an idle engine owes no message: the silence counts from here
                self._heard = time.monotonic()
            self.subscribers[request_id], self.requests[request_id] = sub, request
        self._outbox.put(wire.add(request_id, request.prompt_ids, params, lora))
        sub.metrics.prompt_tokens.inc(len(prompt_ids))
        return request

    def abort(self, request: Request) -> None:
        with self._lock:
            self.subscribers.pop(request.id, None)
            was_open = self.requests.pop(request.id, None) is not None and not request.finished
            if was_open:
                request.finish("abort")
        if was_open:
            self._outbox.put(wire.abort([request.id]))

    def fail_open(self, message: str) -> None:
        """Fail every open request with `message` (a shutdown ending what is left) and abort it in the engine."""
        with self._lock:
            ids = list(self.requests)
        self._fail(ids, message)
        if ids:
            self._outbox.put(wire.abort(ids))

    def pending_aborts(self) -> int:
        """Always 0: an aborted request stops counting as open at once (`stats`)."""
        return 0

    # -- the connection ----------------------------------------------------------------------------

    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self.conn.send_bytes(wire.encode(message))
            except OSError:  # the engine process is gone: the reader reports it
                return
        # Not closed here: the reader may be inside recv_bytes on it, and a connection closed under it
        # fails with a TypeError. The engine exits on STOP (or is killed), the reader sees the EOF.

    def _read(self) -> None:
        fatal = None
        try:
            while True:
                message = wire.decode(self.conn.recv_bytes())
                self._heard = time.monotonic()
                if message["op"] == "fatal":
                    fatal = message["message"]
                else:
                    self._on_message(message)
        except (EOFError, OSError):
            pass
        except Exception:
            if not self._closing:
                log.exception("engine client failed")
                self.process.kill()
        if not self._closing:
            self._died(fatal)

    def _on_message(self, message: dict) -> None:
        op = message["op"]
        if op == "step":
            self._dispatch(message["out"])
            stats = message["stats"]
            self.steps, self.aborted = stats["steps"], stats["aborted"]
            if self.prefix is not None and stats["prefix"] is not None:
                self.prefix = stats["prefix"]
            if self.spec is not None and stats.get("spec") is not None:
                self.spec = SpecStats(**stats["spec"])
        elif op == "failed":
            self._fail(message["ids"], message["message"])
        elif op == "lora":
            self.adapters.answered(message)
        elif op == "ready":
            self._ready(message["info"])
            log.info("the engine process (pid %d) is ready", message["pid"])
            self.warmed.set()

    def _died(self, fatal: str | None) -> None:
        self.process.join(5)
        code = self.process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        if self._hung:
            how = f"sent nothing for {self.step_timeout:g} s with requests open and was killed"
        self.dead = f"The engine process {how}" + (f" ({fatal})" if fatal else "") + "; this server cannot generate."
        log.error("%s", self.dead)
        self.adapters.died(self.dead)
        self.warmed.set()
        with self._lock:
            ids = list(self.requests)
        self._fail(ids, self.dead)
        for callback in self.on_death:
            callback()

    # -- outputs -----------------------------------------------------------------------------------

    def _dispatch(self, outputs: list) -> None:
        now, stopped = time.monotonic(), []
        by_loop: dict = defaultdict(list)
        with self._lock:
            for out in outputs:
                request, sub = self.requests.get(out[0]), self.subscribers.get(out[0])
                if request is None or sub is None or request.finished:
                    continue  # aborted meanwhile, or ended here by a stop string
                item = self._advance(request, sub, out, now)
                if request.finished:
                    del self.requests[request.id], self.subscribers[request.id]
                    if out[2] is None:  # a stop string ended it here: the engine still runs it
                        stopped.append(request.id)
                by_loop[sub.loop].append((sub.queue, item))
        if stopped:
            self._outbox.put(wire.abort(stopped))
        for loop, items in by_loop.items():
            deliver_soon(loop, items)

    def _advance(self, request: Request, sub: Subscriber, out: list, now: float) -> Item:
        """Apply one step's tokens to the request as the scheduler would have in-process."""
        _, tokens, finish_reason, logprobs, prompt_logprobs, accepting = out
        if prompt_logprobs is not None:
            request.add_prompt_logprobs([None if e is None else wire.logprob_of(e) for e in prompt_logprobs], True)
        texts, new_logprobs, n = [], [], 0
        for n, token in enumerate(tokens, 1):
            entry = None if logprobs is None or request.logprobs is None else wire.logprob_of(logprobs[n - 1])
            if entry is not None:
                new_logprobs.append(entry)
            request.append_token(token, entry, now)
            # The engine's stop rules ended it after the last token; a stop string here may end it sooner.
            delta = self.output.delta(request, token, finish_reason if n == len(tokens) else None,
                                      None if accepting is None else accepting[n - 1])
            if delta.finished:
                request.finish(delta.finish_reason)
            texts.append(delta.text)
            if request.finished:
                break
        sub.metrics.record_tokens(request, n, now, sub.last_time, request.finish_reason)
        sub.last_time, sub.sent_tokens = now, sub.sent_tokens + n
        return Item(sub.choice, "".join(texts), tokens[:n], new_logprobs or None, request.finish_reason)

    def _fail(self, ids: list[str], message: str) -> None:
        subs = []
        with self._lock:
            for rid in ids:
                request, sub = self.requests.pop(rid, None), self.subscribers.pop(rid, None)
                if request is not None and not request.finished:
                    request.finish("abort")
                if sub is not None:
                    subs.append(sub)
        deliver_errors(subs, message)
