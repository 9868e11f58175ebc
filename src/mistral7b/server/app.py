"""The app: `build_app(client, ...)` with its routes and middleware, `serve()` under uvicorn, and
`ServerThread` for tests and benchmarks (after vLLM's `api_server.py`).

Routes: `GET /v1/models` and `/v1/models/{id}`, `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`
(serving_models), `POST /v1/completions`, `POST /v1/chat/completions`
(JSON, or Server-Sent Events ending with `data: [DONE]`), `POST /tokenize`, `/detokenize`, `GET /health`,
`GET /metrics` (Prometheus). A bounded wait queue (429 + Retry-After), bearer auth on /v1/*
(`hmac.compare_digest`) and a body size limit (413) guard it; `connections` adds header, body and
keep-alive timeouts, connection caps (503) and rate-limited accept errors; `shutdown` drains on SIGTERM.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

from .connections import GuardedServer, bind_socket, guarded_config
from .client import EngineClient
from .errors import ERROR_RESPONSES, APIError, BodyTooLarge, install_error_handlers, send_error
from .metrics import Metrics
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       DetokenizeRequest, DetokenizeResponse, HealthResponse, TokenizeChatRequest,
                       TokenizeCompletionRequest, TokenizeResponse)
from .serving import Admission
from .serving_chat import OpenAIServingChat
from .serving_completion import OpenAIServingCompletion
from .serving_models import ServedModels, add_model_routes
from .serving_tokenization import OpenAIServingTokenization
from .settings import (DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_KEEP_ALIVE_TIMEOUT, DEFAULT_MAX_BODY_BYTES,
                       DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_CLIENT, DEFAULT_MAX_QUEUE,
                       DEFAULT_SHUTDOWN_TIMEOUT, ENGINE_DEATH_GRACE_S, ENGINE_DIED_EXIT, LOOPBACK, fit_max_connections,
                       resolve_api_key)
from .shutdown import FLUSH_S, Drain

log = logging.getLogger("mistral7b.server")


class _Guard:
    """Pure ASGI middleware (so it also covers streamed bodies and 404s): auth, body limit, metrics."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body_bytes: int, unavailable, unavailable_code):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes
        self.unavailable = unavailable  # why the server cannot serve now (shutting down, engine starting or dead)
        self.unavailable_code = unavailable_code
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
                return await send_error(send_, 401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                        headers={"WWW-Authenticate": "Bearer"})
            problem = self._length_problem(scope)
            if problem is not None:
                return await send_error(send_, *problem)
            unavailable = self._service_problem(path)
            if unavailable is not None:
                return await send_error(send_, 503, unavailable, type="server_error", code=self.unavailable_code())
            await self._limited(scope, receive, send_, state)
        finally:
            self.metrics.count_request(path, state["status"])

    def _service_problem(self, path: str) -> str | None:
        # Everything but the probes needs the engine's limits, which an engine process reports when ready.
        if path in ("/health", "/metrics"):
            return None
        return self.unavailable()

    def _length_problem(self, scope) -> tuple[int, str] | None:
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is None:
            return None
        try:
            too_big = int(length) > self.max_body_bytes
        except ValueError:
            return 400, "invalid Content-Length header"
        return (413, f"request body exceeds the limit of {self.max_body_bytes} bytes") if too_big else None

    async def _limited(self, scope, receive, send, state) -> None:
        """Run the app, counting the body as it streams in (chunked bodies have no Content-Length)."""
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
            await self.app(scope, receive_, send)
        except BodyTooLarge as e:
            if not state["started"]:
                await send_error(send, 413, e.detail)


def _unavailable_code(drain: Drain) -> str:
    return "server_shutting_down" if drain.active else "engine_unavailable"


def default_model_name(source) -> str:
    """The name a checkpoint is served under: its file or folder name (a GGUF's without `.gguf`)."""
    if source is None:
        return "mistral7b"
    name = Path(str(source)).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def _generation_responses(model) -> dict:
    # Before OpenAPI 3.2 an event stream's `schema` describes one event (schemathesis reads it so).
    event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
    return {200: {"model": model, "content": {"text/event-stream": {"schema": event}},
                  "description": "JSON, or Server-Sent Events when stream is true"}, **ERROR_RESPONSES}


APP_DESCRIPTION = "OpenAI-compatible completions and chat completions over the mistral7b engine."


def build_app(client: EngineClient, model_name: str | None = None, api_key: str | None = None,
              max_queue: int = DEFAULT_MAX_QUEUE, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The OpenAI-compatible app over `client`: `EngineDriver(llm)` for an `LLM` in this process (one per
    engine: apps over the same engine share it), or an `EngineProcessClient`. `api_key` guards /v1/*
    with bearer auth. `app.state.drain` is its graceful shutdown, which the server begins on SIGTERM."""
    metrics, drain = Metrics(), Drain(client.fail_open)
    # Why the server answers 503 now: shutting down, or the engine cannot serve (starting, dead).
    unavailable = lambda: drain.problem() or client.unavailable()  # noqa: E731
    model_name = model_name or default_model_name(client.name)
    admission = Admission(client, max_queue)
    metrics.watch(client, lambda: admission.pending)
    models = ServedModels(client, model_name)  # it reads the client's `adapters` and `load_lora`
    serving = (client, metrics, admission, models)
    completion, chat = OpenAIServingCompletion(*serving), OpenAIServingChat(*serving)
    tokenization = OpenAIServingTokenization(client, models)
    app = FastAPI(title="mistral7b", version="0.1.0", description=APP_DESCRIPTION)
    app.state.client, app.state.metrics, app.state.model_name, app.state.drain = client, metrics, model_name, drain
    app.add_middleware(_Guard, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes, unavailable=unavailable,
                       unavailable_code=lambda: _unavailable_code(drain))
    install_error_handlers(app)
    _add_probes(app, client, admission, metrics, unavailable, drain)
    add_model_routes(app, models, lambda: completion.limit)

    @app.post("/v1/completions", summary="Create a completion", response_model=CompletionResponse,
              responses=_generation_responses(CompletionResponse))
    async def create_completion(body: CompletionRequest, request: Request):
        return await completion.create(body, request)

    @app.post("/v1/chat/completions", summary="Create a chat completion", response_model=ChatCompletionResponse,
              responses=_generation_responses(ChatCompletionResponse))
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await chat.create(body, request)

    @app.post("/tokenize", summary="Token ids of a prompt or a conversation", response_model=TokenizeResponse,
              responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest):
        return await tokenization.tokenize(body)

    @app.post("/detokenize", summary="Text of token ids", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest):
        return await tokenization.detokenize(body)

    @app.get("/tokenizer_info", summary="Special tokens and chat template (vLLM's; lm-eval's remote tokenizer)",
             responses=ERROR_RESPONSES)
    async def tokenizer_info() -> dict:
        return tokenization.tokenizer_info()

    app.openapi = lambda: openapi_with_limits(app, completion.context, client.model_info.vocab_size)
    return app


def _add_probes(app: FastAPI, client: EngineClient, admission: Admission, metrics: Metrics, unavailable,
                drain: Drain) -> None:
    """GET /health and GET /metrics (no auth)."""

    @app.get("/health", summary="Liveness (no auth); 503 while an engine process starts, after it died, or while "
             "the server shuts down", response_model=HealthResponse, responses={503: ERROR_RESPONSES[429]})
    async def health():
        if (problem := unavailable()) is not None:
            raise APIError(503, problem, type="server_error", code=_unavailable_code(drain))
        stats = client.stats()
        return HealthResponse(running=stats.running, waiting=stats.waiting + admission.pending)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics_route():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def openapi_with_limits(app: FastAPI, context: int, vocab_size: int) -> dict:
    """The schema, with the served model's limits written into the static request models (max_tokens
    <= context, token ids < vocab_size, top_k <= vocab_size), and without FastAPI's 422 responses: a
    request that fails validation gets a 400 in OpenAI's shape."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            operation.get("responses", {}).pop("422", None)
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            props = schema["components"]["schemas"][name]["properties"]
            for key, bound in (("max_tokens", {"maximum": context}), ("max_completion_tokens", {"maximum": context}),
                               ("top_k", {"maximum": vocab_size}), ("prompt", {"exclusiveMaximum": vocab_size})):
                if key in props:
                    _bound_integers(props[key], bound)
        for unused in ("HTTPValidationError", "ValidationError"):
            schema["components"]["schemas"].pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _bound_integers(node, bound: dict) -> None:
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node.update(bound)
        for value in node.values():
            _bound_integers(value, bound)
    elif isinstance(node, list):
        for value in node:
            _bound_integers(value, bound)


def serve(client: EngineClient, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE, log_level: str = "info",
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          max_connections: int = DEFAULT_MAX_CONNECTIONS, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
          sock: socket.socket | None = None, body_timeout: float = DEFAULT_BODY_TIMEOUT,
          keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT,
          max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
          shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT):
    """Run the server until SIGTERM or SIGINT, then drain (`shutdown`) and return. `api_key` defaults to
    $MISTRAL7B_API_KEY. With an `EngineProcessClient` whose engine process dies, the server answers 503 for
    ENGINE_DEATH_GRACE_S, then exits with ENGINE_DIED_EXIT for a supervisor to restart it. `sock`: a
    socket already bound to `host:port` (bound here if not given: a port in use raises OSError at once)."""
    sock = sock or bind_socket(host, port)
    api_key = resolve_api_key(api_key)
    if host not in LOOPBACK and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model", host)
    fitted = fit_max_connections(max_connections)
    if fitted < max_connections:
        log.warning("--max-connections %d does not fit the open-file limit: using %d", max_connections, fitted)
    client.start()  # an engine in this process compiles here; an engine process reports ready by itself
    app = build_app(client, model_name, api_key=api_key, max_queue=max_queue, max_body_bytes=max_body_bytes)
    config = guarded_config(app, header_timeout, fitted, body_timeout, max_connections_per_client, host=host,
                            port=port, log_level=log_level, timeout_keep_alive=keep_alive_timeout,
                            timeout_graceful_shutdown=FLUSH_S)
    server = GuardedServer(config, drain=app.state.drain, shutdown_timeout=shutdown_timeout)
    client.on_death.append(lambda: threading.Timer(ENGINE_DEATH_GRACE_S, _stop, (server,)).start())
    try:
        server.run(sockets=[sock])
    finally:
        client.close()  # the engine (its thread, or its process) stops with the server
    if client.dead:
        raise SystemExit(ENGINE_DIED_EXIT)
    if not server.started:  # uvicorn logged why
        raise SystemExit(3)


def _stop(server) -> None:
    log.error("exiting (status %d): the engine process is gone", ENGINE_DIED_EXIT)
    server.should_exit = True


class ServerThread:
    """uvicorn in a background thread on a free loopback port (tests and benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                 shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT, **limits):
        """`limits`: guarded_config's and uvicorn's other keywords (body_timeout, timeout_keep_alive...)."""
        config = guarded_config(app, header_timeout, max_connections, host=host, port=port, log_level=log_level,
                                **{"timeout_graceful_shutdown": FLUSH_S, **limits})
        drain = getattr(getattr(app, "state", None), "drain", None)  # a bare ASGI app (tests) has none
        self.server = GuardedServer(config, drain=drain, shutdown_timeout=shutdown_timeout)
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
