"""An OpenAI-compatible HTTP server over the continuous-batching engine.

`create_app(llm, model_name)` builds a FastAPI app; `serve(llm, ...)` runs it under uvicorn.

* `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (non-streaming, and streaming as
  Server-Sent Events ending with `data: [DONE]`), `GET /health`, `GET /metrics` (Prometheus text).
* One background thread per engine (`EngineDriver`) loops `engine.step()` while there is work and
  sleeps on an event when idle; each step's deltas go to the asyncio queue of the HTTP request that
  owns them through `loop.call_soon_threadsafe`. Model work never runs on the event loop.
* Bounded wait queue (429 + Retry-After), client disconnects abort their engine requests (the row is
  free before the next step), bearer auth on /v1/* (`hmac.compare_digest`), body size limit (413),
  and every error in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .sampling import SamplingParams

log = logging.getLogger("mistral7b.server")

DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_BODY_BYTES = 1 << 20
API_KEY_ENV = "MISTRAL7B_API_KEY"
POLL_DISCONNECT_S = 0.25  # how often a waiting request checks whether its client went away
MAX_N = 16  # choices per request
MAX_PROMPTS = 256  # prompts in one /v1/completions request
MAX_STOP = 16


# ---------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


class BodyTooLarge(StarletteHTTPException):
    """Raised from inside `receive`; an HTTPException so FastAPI's body reader passes it through."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
          429: "rate_limit_exceeded"}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str | None = None, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = code if code is not None else _CODES.get(status)
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


async def _send_error(send, status: int, message: str, headers: dict[str, str] | None = None, **kw) -> None:
    """Send an OpenAI-shaped error from a pure ASGI middleware."""
    response = error_response(status, message, headers=headers, **kw)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive():  # pragma: no cover - JSONResponse never reads
    return {"type": "http.disconnect"}


# ---------------------------------------------------------------------------------------------------
# Request and response models


class _Strict(BaseModel):
    # strict: no "1" -> 1 or true -> 1 coercion; no NaN/inf; unknown OpenAI fields are ignored.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


def _request_models(context: int, vocab_size: int):
    """Request models whose ranges know the model: max_tokens <= context, token ids < vocab."""
    Id = Annotated[int, Field(ge=0, lt=vocab_size)]
    Ids = Annotated[list[Id], Field(min_length=1)]

    class _Sampling(_Strict):
        model: str = Field(description="the model name, as /v1/models lists it")
        max_tokens: int | None = Field(None, ge=1, le=context, description="tokens to generate at most")
        max_completion_tokens: int | None = Field(None, ge=1, le=context, description="alias of max_tokens")
        temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default 1")
        top_p: float | None = Field(None, gt=0, le=1)
        n: int = Field(1, ge=1, le=MAX_N)
        stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
        seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
        presence_penalty: float | None = Field(None, ge=-2, le=2)
        frequency_penalty: float | None = Field(None, ge=-2, le=2)
        stream: bool = False
        stream_options: StreamOptions | None = None
        user: str | None = None
        # extensions
        top_k: int | None = Field(None, ge=-1, le=vocab_size, description="extension; 0 or -1 = off")
        min_p: float | None = Field(None, ge=0, le=1, description="extension")
        repetition_penalty: float | None = Field(None, gt=0, le=100, description="extension (HF style)")
        ignore_eos: bool = Field(False, description="extension: keep generating past end-of-sequence tokens")

    class CompletionRequest(_Sampling):
        prompt: (
            str
            | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
            | Ids
            | Annotated[list[Ids], Field(min_length=1, max_length=MAX_PROMPTS)]
        ) = Field(description="a string, a list of strings, a list of token ids, or a list of token-id lists")
        logprobs: int | None = Field(None, ge=0, le=20, description="how many top log-probabilities per token")

    class ChatCompletionRequest(_Sampling):
        messages: list[ChatMessage] = Field(min_length=1)
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0, le=20)
        safe_prompt: bool = Field(False, description="extension: prepend Mistral's guardrail system prompt")

    return CompletionRequest, ChatCompletionRequest


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mistral7b"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429)}


def _generation_responses(model: type[BaseModel]) -> dict:
    return {200: {"model": model, "content": {"text/event-stream": {"schema": {"type": "string"}}},
                  "description": "JSON, or Server-Sent Events when stream is true"}, **_ERRORS}


# ---------------------------------------------------------------------------------------------------
# Metrics (Prometheus text format, hand-written)

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float, times: int = 1) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += times
                break
        self.sum += value * times
        self.count += times

    def render(self, name: str, help: str) -> list[str]:
        lines = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        cumulative = 0
        for b, c in zip(self.buckets, self.counts):
            cumulative += c
            lines.append(f'{name}_bucket{{le="{b}"}} {cumulative}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return lines


class Metrics:
    """Counters and histograms shared by the event loop and the engine thread."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = defaultdict(int)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def count_request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[(path if path in self.ROUTES else "other", status)] += 1

    def render(self, engine, queued: int) -> str:
        with self.lock:
            lines = ["# HELP mistral7b_http_requests_total HTTP requests by route and status code.",
                     "# TYPE mistral7b_http_requests_total counter"]
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'mistral7b_http_requests_total{{path="{path}",code="{status}"}} {n}')
            lines += ["# HELP mistral7b_prompt_tokens_total Prompt tokens of admitted sequences.",
                      "# TYPE mistral7b_prompt_tokens_total counter",
                      f"mistral7b_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP mistral7b_generation_tokens_total Generated tokens.",
                      "# TYPE mistral7b_generation_tokens_total counter",
                      f"mistral7b_generation_tokens_total {self.generation_tokens}",
                      "# HELP mistral7b_sequences_finished_total Finished sequences by finish reason.",
                      "# TYPE mistral7b_sequences_finished_total counter"]
            for reason, n in sorted(self.finished.items()):
                lines.append(f'mistral7b_sequences_finished_total{{finish_reason="{reason}"}} {n}')
            lines += ["# HELP mistral7b_num_requests_running Sequences holding a cache row.",
                      "# TYPE mistral7b_num_requests_running gauge",
                      f"mistral7b_num_requests_running {engine.n_running}",
                      "# HELP mistral7b_num_requests_waiting Sequences waiting for a cache row.",
                      "# TYPE mistral7b_num_requests_waiting gauge",
                      f"mistral7b_num_requests_waiting {engine.n_waiting + queued}"]
            lines += self.ttft.render("mistral7b_time_to_first_token_seconds", "Time from arrival to first token.")
            lines += self.itl.render("mistral7b_inter_token_latency_seconds", "Time between tokens of a sequence.")
            lines += self.e2e.render("mistral7b_e2e_request_latency_seconds", "Time from arrival to last token.")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# The engine thread


@dataclasses.dataclass
class Item:
    """What one engine step produced for one choice, as delivered to the event loop."""

    choice: int
    text: str
    token_ids: list[int]
    logprobs: list | None  # TokenLogprob entries of these tokens
    finish_reason: str | None
    error: str | None = None


@dataclasses.dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    choice: int
    metrics: Metrics
    sent_tokens: int = 0
    last_time: float | None = None


class EngineDriver:
    """The one thread that runs `engine.step()`; everything else talks to it through this object.

    `submit` adds requests (any thread), `abort` queues an abort that the thread applies before its next
    step, so an aborted request's row is free for that step. One driver per engine, shared by every app
    built on the same LLM (`driver_for`).
    """

    def __init__(self, engine):
        self.engine = engine
        self.subscribers: dict[str, _Subscriber] = {}
        self.requests: dict[str, Any] = {}
        self._aborts: list = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.warmed = threading.Event()
        self.steps = 0
        self.aborted = 0

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mistral7b-engine", daemon=True)
                self._thread.start()

    def warm_up(self) -> "EngineDriver":
        """Start the thread and wait until it has warmed the engine up (compiled it, if it compiles)."""
        self.start()
        self.warmed.wait()
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str, sub: _Subscriber):
        self.start()
        with self._lock:
            self.subscribers[request_id] = sub
        try:
            request = self.engine.add(prompt_ids, params, request_id)
        except BaseException:
            with self._lock:
                self.subscribers.pop(request_id, None)
            raise
        with self._lock:
            self.requests[request_id] = request
        with sub.metrics.lock:
            sub.metrics.prompt_tokens += len(prompt_ids)
        self._wake.set()
        return request

    def abort(self, request) -> None:
        with self._lock:
            self.subscribers.pop(request.id, None)
            self.requests.pop(request.id, None)
            if not request.finished:
                self._aborts.append(request)
        self._wake.set()

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
        while True:
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
                m = sub.metrics
                with m.lock:
                    m.generation_tokens += k
                    if sub.last_time is None:
                        if request.first_token_time is not None:
                            m.ttft.observe(request.first_token_time - request.arrival_time)
                    else:
                        m.itl.observe((now - sub.last_time) / k, k)
                    if d.finished:
                        m.finished[d.finish_reason] += 1
                        m.e2e.observe(now - request.arrival_time)
                sub.last_time = now
                item = Item(sub.choice, d.text, list(d.token_ids), lps, d.finish_reason)
                if d.finished:
                    self.subscribers.pop(request.id, None)
                    self.requests.pop(request.id, None)
                by_loop[sub.loop].append((sub.queue, item))
        for loop, items in by_loop.items():
            _deliver_soon(loop, items)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            subs = list(self.subscribers.items())
            self.subscribers.clear()
            requests, self.requests = self.requests, {}
        for request in requests.values():
            self.engine.abort(request)
        by_loop: dict = defaultdict(list)
        for _, sub in subs:
            by_loop[sub.loop].append((sub.queue, Item(sub.choice, "", [], None, None, error=message)))
        for loop, items in by_loop.items():
            _deliver_soon(loop, items)


def _deliver_soon(loop, items) -> None:
    def put():
        for queue, item in items:
            queue.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


_drivers: dict[int, EngineDriver] = {}
_drivers_lock = threading.Lock()


def driver_for(engine) -> EngineDriver:
    with _drivers_lock:
        driver = _drivers.get(id(engine))
        if driver is None or driver.engine is not engine:
            driver = _drivers[id(engine)] = EngineDriver(engine)
        return driver


# ---------------------------------------------------------------------------------------------------
# Middleware: metrics, auth, body limit (pure ASGI, so it also covers streamed bodies and 404s)

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class _Guard:
    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes
        self.api_key = api_key.encode() if api_key else None

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, state = scope["path"], {"status": 500, "started": False}

        async def send_(message):
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)

        try:
            if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")) and not self._authorized(scope):
                return await _send_error(send_, 401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                         headers={"WWW-Authenticate": "Bearer"})
            length = dict(scope.get("headers") or ()).get(b"content-length")
            if length is not None:
                try:
                    too_big = int(length) > self.max_body_bytes
                except ValueError:
                    return await _send_error(send_, 400, "invalid Content-Length header")
                if too_big:
                    return await _send_error(send_, 413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
            received = 0

            async def receive_():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise BodyTooLarge(self.max_body_bytes)
                return message

            try:
                await self.app(scope, receive_, send_)
            except BodyTooLarge as e:
                if not state["started"]:
                    await _send_error(send_, 413, e.detail)
        finally:
            self.metrics.count_request(path, state["status"])


# ---------------------------------------------------------------------------------------------------
# The app


def default_model_name(llm) -> str:
    source = getattr(llm, "source", None)
    if source is None:
        return "mistral7b"
    name = Path(str(source)).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def _message_dict(m) -> dict:
    role = "system" if m.role == "developer" else m.role
    content = m.content
    if content is None:
        content = ""
    elif isinstance(content, list):
        content = "".join(part.text for part in content)
    d = {"role": role, "content": content}
    if m.name is not None:
        d["name"] = m.name
    return d


def _finite(x: float) -> float:
    return x if x == x and abs(x) != float("inf") else -9999.0


def _validation_message(errors) -> tuple[str, str | None]:
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        return f"We could not parse the JSON body of your request: {e.get('ctx', {}).get('error', 'invalid JSON')}", None
    param = loc[0] if loc else None
    where = ".".join(loc)
    msg = e.get("msg", "invalid value")
    if e.get("type") == "missing":
        return f"Missing required parameter: '{where}'.", param
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"Invalid value for '{where}': {msg}{more}" if where else msg + more, param


class _Disconnected(Exception):
    pass


async def _batches(queue: asyncio.Queue, request: Request, count: int):
    """Yield lists of `Item`s (all that have arrived) until `count` choices finished; raise
    _Disconnected if the client goes away. A multi-step decode delivers several tokens per request at
    once, and writing them in one send keeps the event loop's work per token small."""
    getter: asyncio.Task | None = None
    last_check = time.monotonic()
    try:
        while count:
            if getter is None:
                getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter}, timeout=POLL_DISCONNECT_S)
            now = time.monotonic()
            if now - last_check >= POLL_DISCONNECT_S:  # also while items keep coming
                last_check = now
                if await request.is_disconnected():
                    raise _Disconnected()
            if not done:
                continue
            batch, getter = [getter.result()], None
            while not queue.empty():
                batch.append(queue.get_nowait())
            for item in batch:
                if item.error is not None:
                    raise APIError(500, item.error, type="server_error", code="engine_error")
                if item.finish_reason is not None:
                    count -= 1
            yield batch
    finally:
        if getter is not None:
            getter.cancel()


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that runs `on_close` however the stream ends. When the client disconnects,
    Starlette cancels the stream task; if that happens while the generator is suspended at a `yield`,
    the generator's own `finally` would only run when it is garbage-collected (possibly much later,
    through a reference cycle), so the abort must not depend on it."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            await self.body_iterator.aclose()


def create_app(llm, model_name: str, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The OpenAI-compatible app for `llm` (an `LLM`, or anything with `.engine`, `.tokenizer`,
    `.encode_prompt` and `.chat_prompt`). `api_key` guards /v1/* with bearer auth."""
    engine = llm.engine
    driver = driver_for(engine)
    metrics = Metrics()
    tokenizer = getattr(llm, "tokenizer", None)
    limit = engine.cache.max_positions  # None: sliding window everywhere, sequences may grow unbounded
    context = limit or engine.config.max_seq_len
    vocab_size = engine.config.vocab_size
    CompletionRequest, ChatCompletionRequest = _request_models(context, vocab_size)
    created_at = int(time.time())
    state = {"pending": 0}  # accepted by the server, not yet in the engine's queue

    app = FastAPI(title="mistral7b", version="0.1.0",
                  description="OpenAI-compatible completions and chat completions over the mistral7b engine.")
    app.state.llm, app.state.driver, app.state.metrics, app.state.model_name = llm, driver, metrics, model_name
    app.add_middleware(_Guard, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes)

    # -- errors ----------------------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"Unknown route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} not allowed on {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(ValueError)
    async def _on_value_error(request: Request, exc: ValueError):
        return error_response(400, str(exc) or "invalid request")

    @app.exception_handler(Exception)
    async def _on_exception(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "The server had an error while processing your request.", "server_error")

    # -- plain routes ----------------------------------------------------------------------------

    @app.get("/health", summary="Liveness (no auth)")
    async def health():
        return {"status": "ok", "running": engine.n_running, "waiting": engine.n_waiting + state["pending"]}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics_route():
        text = metrics.render(engine, state["pending"])
        text += ("# HELP mistral7b_sequences_aborted_total Sequences aborted (client gone).\n"
                 "# TYPE mistral7b_sequences_aborted_total counter\n"
                 f"mistral7b_sequences_aborted_total {driver.aborted}\n"
                 "# HELP mistral7b_engine_steps_total Engine steps run.\n"
                 "# TYPE mistral7b_engine_steps_total counter\n"
                 f"mistral7b_engine_steps_total {driver.steps}\n")
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models():
        return ModelList(data=[ModelCard(id=model_name, created=created_at, max_model_len=limit)])

    # -- generation ------------------------------------------------------------------------------

    token_text_cache: dict[int, str] = {}

    def token_text(token_id: int) -> str:
        text = token_text_cache.get(token_id)
        if text is None:
            text = tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"
            if len(token_text_cache) < 200_000:
                token_text_cache[token_id] = text
        return text

    def check_model(body) -> None:
        if body.model != model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{model_name}'.",
                           param="model", code="model_not_found")

    def base_params(body, logprobs: int | None) -> dict:
        top_k = body.top_k or 0
        return dict(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0 if top_k < 0 else top_k,
            min_p=body.min_p or 0.0,
            stop=body.stop,
            seed=body.seed,
            logprobs=logprobs,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            ignore_eos=body.ignore_eos,
        )

    def make_params(kw: dict, max_tokens: int | None, prompt_len: int, default: int | None, choice: int, param: str):
        if max_tokens is None:
            room = (limit - prompt_len) if limit is not None else None
            max_tokens = default if default is not None else room if room is not None else 256
            if room is not None:
                max_tokens = min(max_tokens, room)
            if max_tokens < 1:
                raise APIError(400, f"The prompt ({prompt_len} tokens) fills this model's context of {limit} tokens.",
                               param=param, code="context_length_exceeded")
        kw = dict(kw, max_tokens=max_tokens)
        if kw["seed"] is not None and choice:
            kw["seed"] = ((kw["seed"] + choice + (1 << 63)) % (1 << 64)) - (1 << 63)
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def queue_full(n_new: int) -> bool:
        free = max(0, engine.max_batch - engine.n_running)
        return engine.n_waiting + state["pending"] + n_new - free > max_queue

    async def start(body, rid: str, prompts_ids_fn, n_prompts: int, kw: dict, default_max: int | None, param: str):
        """Admission: queue bound, tokenization off the loop, validation, submission to the engine."""
        n_seqs = n_prompts * body.n
        if n_seqs > max_queue + engine.max_batch:
            raise APIError(400, f"this request asks for {n_seqs} sequences; the server holds at most "
                           f"{max_queue + engine.max_batch}", param="n")
        if queue_full(n_seqs):
            raise APIError(429, "The server is busy: too many requests are waiting. Retry shortly.",
                           headers={"Retry-After": "1"})
        state["pending"] += n_seqs
        try:
            try:
                prompt_ids = await run_in_threadpool(prompts_ids_fn)
            except APIError:
                raise
            except Exception as e:  # template or tokenizer rejected the input
                raise APIError(400, f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e),
                               param=param) from None
            max_tokens = body.max_completion_tokens or body.max_tokens
            plan = []
            for i, ids in enumerate(prompt_ids):
                for j in range(body.n):
                    params = make_params(kw, max_tokens, len(ids), default_max, j, param)
                    try:
                        engine.validate(ids, params)
                    except ValueError as e:
                        code = "context_length_exceeded" if "context" in str(e) else None
                        raise APIError(400, str(e), param=param, code=code) from None
                    plan.append((i * body.n + j, ids, params))
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            submitted = []
            try:
                for index, ids, params in plan:
                    sub = _Subscriber(loop, queue, index, metrics)
                    submitted.append(driver.submit(ids, params, f"{rid}-{index}", sub))
            except BaseException:
                for r in submitted:
                    driver.abort(r)
                raise
            return prompt_ids, submitted, queue
        finally:
            state["pending"] -= n_seqs

    def usage(prompt_ids, n_completion) -> dict:
        n_prompt = sum(len(ids) for ids in prompt_ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}

    def completion_logprobs(entries, offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for e in entries:
            t = token_text(e.token_id)
            tokens.append(t)
            token_lps.append(_finite(e.logprob))
            tops.append({token_text(i): _finite(lp) for i, lp in e.top})
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(entries) -> list[dict]:
        def one(token_id, lp):
            t = token_text(token_id)
            return {"token": t, "logprob": _finite(lp), "bytes": list(t.encode("utf-8", "replace"))}

        return [{**one(e.token_id, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]} for e in entries]

    def abort_all(submitted) -> None:
        for r in submitted:
            if not r.finished:
                driver.abort(r)

    async def collect(request: Request, submitted, queue) -> list[dict]:
        out = [{"text": [], "tokens": 0, "logprobs": [], "finish_reason": None} for _ in submitted]
        try:
            async for batch in _batches(queue, request, len(submitted)):
                for item in batch:
                    o = out[item.choice]
                    o["text"].append(item.text)
                    o["tokens"] += len(item.token_ids)
                    if item.logprobs:
                        o["logprobs"] += item.logprobs
                    if item.finish_reason is not None:
                        o["finish_reason"] = item.finish_reason
        except _Disconnected:  # nobody will read this; 499 ("client closed request") shows in /metrics
            raise APIError(499, "the client disconnected", code="client_disconnected") from None
        finally:
            abort_all(submitted)
        for o in out:
            o["text"] = "".join(o["text"])
        return out

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    async def stream(request: Request, submitted, queue, make_chunk, first_chunks, include_usage, usage_fn):
        """SSE: first chunks, one chunk per item, optional usage chunk, [DONE]. Aborts on disconnect."""
        n_completion = 0
        try:
            for chunk in first_chunks:
                yield sse(chunk)
            async for batch in _batches(queue, request, len(submitted)):
                events = []
                for item in batch:
                    n_completion += len(item.token_ids)
                    for chunk in make_chunk(item):
                        if include_usage:
                            chunk["usage"] = None
                        events.append(sse(chunk))
                if events:
                    yield "".join(events)
            if include_usage:
                yield sse(usage_fn(n_completion))
            yield "data: [DONE]\n\n"
        except _Disconnected:
            return
        except APIError as e:
            yield sse(error_body(e.message, e.type, e.param, e.code))
            yield "data: [DONE]\n\n"
        finally:
            abort_all(submitted)

    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    async def create_completion(body, request: Request):
        check_model(body)
        rid = f"cmpl-{uuid.uuid4().hex}"
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        kw = base_params(body, body.logprobs)
        encode = lambda: [llm.encode_prompt(p) for p in prompts]  # noqa: E731
        prompt_ids, submitted, queue = await start(body, rid, encode, len(prompts), kw, 16, "prompt")
        created = int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        want_lp = body.logprobs is not None
        if not body.stream:
            out = await collect(request, submitted, queue)
            choices = [{"index": i, "text": o["text"],
                        "logprobs": completion_logprobs(o["logprobs"], 0) if want_lp else None,
                        "finish_reason": o["finish_reason"]} for i, o in enumerate(out)]
            return JSONResponse({**base, "choices": choices, "usage": usage(prompt_ids, sum(o["tokens"] for o in out)),
                                 "system_fingerprint": None})
        offsets = [0] * len(submitted)

        def make_chunk(item: Item):
            # Without a tokenizer there is no text: still send one (empty) chunk per token, so clients see progress.
            if not (item.text or item.finish_reason or (want_lp and item.logprobs) or tokenizer is None):
                return []
            lp = completion_logprobs(item.logprobs or [], offsets[item.choice]) if want_lp else None
            offsets[item.choice] += len(item.text)
            return [{**base, "choices": [{"index": item.choice, "text": item.text, "logprobs": lp,
                                          "finish_reason": item.finish_reason}]}]

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage_chunk = lambda n: {**base, "choices": [], "usage": usage(prompt_ids, n)}  # noqa: E731
        return _SSEResponse(stream(request, submitted, queue, make_chunk, [], include_usage, usage_chunk),
                            lambda: abort_all(submitted), media_type="text/event-stream", headers=sse_headers)

    async def create_chat_completion(body, request: Request):
        check_model(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        messages = [_message_dict(m) for m in body.messages]
        kw = base_params(body, (body.top_logprobs or 0) if body.logprobs else None)
        render = lambda: [llm.chat_prompt(messages, body.safe_prompt)]  # noqa: E731
        prompt_ids, submitted, queue = await start(body, rid, render, 1, kw, None, "messages")
        created = int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "system_fingerprint": None}
        if not body.stream:
            out = await collect(request, submitted, queue)
            choices = [{"index": i, "message": {"role": "assistant", "content": o["text"]},
                        "logprobs": {"content": chat_logprobs(o["logprobs"])} if body.logprobs else None,
                        "finish_reason": o["finish_reason"]} for i, o in enumerate(out)]
            return JSONResponse({**base, "choices": choices, "usage": usage(prompt_ids, sum(o["tokens"] for o in out))})
        base = {**base, "object": "chat.completion.chunk"}

        def chunk(index, delta, logprobs=None, finish_reason=None):
            return {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]}

        first = [chunk(i, {"role": "assistant", "content": ""}) for i in range(len(submitted))]

        def make_chunk(item: Item):
            chunks = []
            lp = {"content": chat_logprobs(item.logprobs or [])} if body.logprobs and item.logprobs else None
            if item.text or lp:
                chunks.append(chunk(item.choice, {"content": item.text}, lp))
            if item.finish_reason is not None:
                chunks.append(chunk(item.choice, {}, None, item.finish_reason))
            return chunks

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage_chunk = lambda n: {**base, "choices": [], "usage": usage(prompt_ids, n)}  # noqa: E731
        return _SSEResponse(stream(request, submitted, queue, make_chunk, first, include_usage, usage_chunk),
                            lambda: abort_all(submitted), media_type="text/event-stream", headers=sse_headers)

    # The request models are local classes, so give FastAPI the real annotations.
    create_completion.__annotations__.update(body=CompletionRequest, request=Request)
    create_chat_completion.__annotations__.update(body=ChatCompletionRequest, request=Request)
    app.add_api_route("/v1/completions", create_completion, methods=["POST"], summary="Create a completion",
                      responses=_generation_responses(CompletionResponse), response_model=None)
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"],
                      summary="Create a chat completion",
                      responses=_generation_responses(ChatCompletionResponse), response_model=None)
    return app


# ---------------------------------------------------------------------------------------------------
# Running it


def serve(llm, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, model_name: str | None = None,
          max_queue: int = DEFAULT_MAX_QUEUE, log_level: str = "info", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    """Run the server until interrupted. `api_key` defaults to $MISTRAL7B_API_KEY."""
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    model_name = model_name or default_model_name(llm)
    if host not in _LOOPBACK and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model", host)
    if llm.engine.compiled:
        log.warning("compiling the decode step before serving (a minute or two on a GPU)")
        driver_for(llm.engine).warm_up()
    app = create_app(llm, model_name, api_key=api_key, max_queue=max_queue, max_body_bytes=max_body_bytes)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class ServerThread:
    """uvicorn in a background thread on a free loopback port (tests and benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.host = host
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.port: int | None = None

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
