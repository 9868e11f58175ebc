"""The base of the OpenAI endpoints (`serving_completion`, `serving_chat`).

`OpenAIServing` admits a request (queue bound, tokenization off the event loop, validation, one engine
request per choice), then either collects the choices or streams them as Server-Sent Events; the
completion and chat subclasses shape the bodies. A client that goes away aborts its engine requests.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from .client import EngineClient
from .driver import Item, Subscriber
from .errors import APIError
from .protocol import SamplingRequest, Usage

POLL_DISCONNECT_S = 0.25  # how often a waiting request checks whether its client went away
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Admission:
    """The wait-queue bound, shared by every endpoint of one app: requests accepted by the server but
    not yet in the engine's queue count as waiting."""

    client: EngineClient
    max_queue: int
    pending: int = 0

    def full(self, n_new: int) -> bool:
        # Aborts queued for the engine thread free their rows before the step that admits these requests,
        # so they count as free now (the thread may be in the middle of a long multi-step decode).
        stats = self.client.stats()
        busy = stats.waiting + stats.running - self.client.pending_aborts()
        return busy + self.pending + n_new - self.client.model_info.max_batch > self.max_queue


@dataclass
class Submission:
    """One HTTP request's engine requests (one per prompt and choice) and the queue their items reach."""

    id: str
    prompt_ids: list[list[int]]
    requests: list
    queue: asyncio.Queue
    created: int = field(default_factory=lambda: int(time.time()))
    offsets: list[int] = field(default_factory=list)  # text characters streamed so far, per choice
    tools: list | None = None  # serving_chat's ToolStream per choice, for a streamed tool-calling request
    echoes: list | None = None  # serving_completion's echo text per choice, until its first chunk is sent
    model: str = ""  # the name the responses carry in `model`: the LoRA adapter's, else the base model's


@dataclass
class ChoiceOutput:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


class _Disconnected(Exception):
    pass


class OpenAIServing:
    """What the completion and chat endpoints share: start, collect, stream."""

    id_prefix = ""
    default_max_tokens: int | None = None  # None: the rest of the context
    prompt_param = "prompt"

    def __init__(self, client: EngineClient, metrics, admission: Admission, models):
        """`models`: the served names, the base model's and its LoRA adapters' (serving_models)."""
        self.client, self.metrics, self.admission = client, metrics, admission
        self.models, self.model_name = models, models.base
        self.tokenizer = client.tokenizer
        self._token_texts: dict[int, str] = {}

    # Read when asked: an engine in its own process reports them once it has loaded the model.
    @property
    def limit(self) -> int | None:
        return self.client.model_info.max_positions  # None: every layer rolls, sequences grow unbounded

    @property
    def context(self) -> int:
        return self.client.model_info.max_model_len

    # -- checks ----------------------------------------------------------------------------------

    def check_request(self, body: SamplingRequest) -> None:
        self.models.resolve(body.model)
        vocab = self.client.model_info.vocab_size
        for name, value, bound in (("max_tokens", body.max_tokens, self.context),
                                   ("max_completion_tokens", body.max_completion_tokens, self.context),
                                   ("top_k", body.top_k, vocab)):
            if value is not None and value > bound:
                raise APIError(400, f"Invalid value for '{name}': Input should be less than or equal to {bound}",
                               param=name)
        outside = [k for k, _ in (body.token_biases() or {}).items() if k >= vocab]
        if outside:
            raise APIError(400, f"Invalid key in 'logit_bias': token id {outside[0]} is not in this model's vocabulary "
                           f"(ids 0 to {vocab - 1})", param="logit_bias")

    def sampling_params(self, body: SamplingRequest, prompt_len: int, choice: int):
        max_tokens = body.requested_max_tokens
        if max_tokens is None:
            room = (self.limit - prompt_len) if self.limit is not None else None
            default = self.default_max_tokens
            max_tokens = default if default is not None else room if room is not None else 256
            if room is not None:
                max_tokens = min(max_tokens, room)
            if max_tokens < 1:
                raise APIError(400, f"The prompt ({prompt_len} tokens) fills this model's context of {self.limit} "
                               "tokens.", param=self.prompt_param, code="context_length_exceeded")
        try:
            return body.to_sampling_params(max_tokens, choice)
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "param", None)) from None

    # -- admission -------------------------------------------------------------------------------

    async def start(self, body: SamplingRequest, encode, n_prompts: int) -> Submission:
        """Admission: queue bound, tokenization off the loop (`encode()` gives the prompts' ids),
        validation, then one engine request per prompt and choice."""
        n_seqs = n_prompts * body.n
        admission = self.admission
        most = admission.max_queue + self.client.model_info.max_batch
        if n_seqs > most:
            asked = f"{n_prompts} prompts" + (f" x n={body.n}" if body.n > 1 else "") if n_prompts > 1 else f"n={body.n}"
            raise APIError(400, f"this request asks for {n_seqs} sequences ({asked}); the server holds at most {most} "
                           "(its batch plus its wait queue)", param=self.prompt_param if n_prompts > 1 else "n")
        if admission.full(n_seqs):
            raise APIError(429, "The server is busy: too many requests are waiting. Retry shortly.",
                           headers={"Retry-After": "1"})
        admission.pending += n_seqs
        try:
            prompt_ids = await self._encode(encode)
            plan = [(i * body.n + j, ids, self._validated(body, ids, j))
                    for i, ids in enumerate(prompt_ids) for j in range(body.n)]
            lora = self.models.resolve(body.model)
            return self._submit(prompt_ids, plan, f"{self.id_prefix}{uuid.uuid4().hex}", lora)
        finally:
            admission.pending -= n_seqs

    async def _encode(self, encode) -> list[list[int]]:
        try:
            return await run_in_threadpool(encode)
        except APIError:
            raise
        except Exception as e:  # template or tokenizer rejected the input
            raise APIError(400, f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e),
                           param=self.prompt_param) from None

    def _validated(self, body: SamplingRequest, ids: list[int], choice: int):
        params = self.sampling_params(body, len(ids), choice)
        try:
            self.client.validate(ids, params)
        except ValueError as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            raise APIError(400, str(e), param=self.prompt_param, code=code) from None
        return params

    def _submit(self, prompt_ids, plan, rid: str, lora: str | None = None) -> Submission:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        submitted = []
        try:
            for index, ids, params in plan:
                sub = Subscriber(loop, queue, index, self.metrics)
                adapter = {"lora": lora} if lora is not None else {}  # a client without adapters takes no `lora`
                submitted.append(self.client.submit(ids, params, f"{rid}-{index}", sub, **adapter))
        except BaseException as e:
            for r in submitted:
                self.client.abort(r)
            if isinstance(e, LookupError):  # the adapter was unloaded since the request named it
                raise APIError(404, str(e), param="model", code="model_not_found") from None
            raise
        return Submission(rid, prompt_ids, submitted, queue, model=lora or self.model_name)

    def abort(self, submission: Submission) -> None:
        for r in submission.requests:
            if not r.finished:
                self.client.abort(r)

    # -- results ---------------------------------------------------------------------------------

    async def collect(self, request: Request, submission: Submission) -> list[ChoiceOutput]:
        out = [ChoiceOutput() for _ in submission.requests]
        try:
            async for batch in _batches(submission.queue, request, len(submission.requests)):
                for item in batch:
                    o = out[item.choice]
                    o.text.append(item.text)
                    o.tokens += len(item.token_ids)
                    if item.logprobs:
                        o.logprobs += item.logprobs
                    if item.finish_reason is not None:
                        o.finish_reason = item.finish_reason
        except _Disconnected:  # nobody will read this; 499 ("client closed request") shows in /metrics
            raise APIError(499, "the client disconnected", code="client_disconnected") from None
        finally:
            self.abort(submission)
        return out

    def stream(self, request: Request, submission: Submission, body: SamplingRequest, first=()) -> StreamingResponse:
        """SSE: `first` chunks, the chunks of each item, an optional usage chunk, then [DONE]."""
        events = self._events(request, submission, body, first)
        return _SSEResponse(events, lambda: self.abort(submission), media_type="text/event-stream",
                            headers=SSE_HEADERS)

    async def _events(self, request, submission, body, first):
        n_completion, include_usage = 0, body.include_usage
        try:
            for chunk in first:
                yield _sse(chunk, include_usage)
            async for batch in _batches(submission.queue, request, len(submission.requests)):
                events = []
                for item in batch:
                    n_completion += len(item.token_ids)
                    events += [_sse(chunk, include_usage) for chunk in self.chunks(submission, body, item)]
                if events:
                    yield "".join(events)
            if include_usage:
                yield _sse(self.usage_chunk(submission, Usage.of(submission.prompt_ids, n_completion)), True)
            yield "data: [DONE]\n\n"
        except _Disconnected:
            return
        except APIError as e:
            yield f"data: {e.body().model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.abort(submission)

    def chunks(self, submission: Submission, body, item: Item) -> list:
        """The stream chunks (protocol models) of one item."""
        raise NotImplementedError

    def usage_chunk(self, submission: Submission, usage: Usage):
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        """A token's text for logprobs. Unique per token as OpenAI's: a token that is part of a UTF-8
        character is "bytes:" and its bytes escaped (where decoding it alone would give U+FFFD)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = f"token_id:{token_id}" if self.tokenizer is None else _bytes_text(self.token_bytes(token_id))
            if len(self._token_texts) < 200_000:
                self._token_texts[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.token_bytes(token_id) if self.tokenizer is not None else b""


def _bytes_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def finite(x: float) -> float:
    """JSON has no NaN or infinity: a log-probability of -inf is sent as -9999."""
    return x if x == x and abs(x) != float("inf") else -9999.0


def _sse(chunk, include_usage: bool) -> str:
    # Every field is set explicitly, so exclude_unset drops only `usage` (unless asked for) and the
    # delta fields a chunk does not carry.
    if include_usage and "usage" not in chunk.model_fields_set:
        chunk.usage = None
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"


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

