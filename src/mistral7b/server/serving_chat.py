"""`POST /v1/chat/completions` (after vLLM's `serving_chat.py`)."""

from __future__ import annotations

from fastapi import Request
from prometheus_client import Counter

from . import tool_plan
from .driver import Item
from .errors import APIError
from .metrics import PREFIX as METRICS_PREFIX
from .protocol import (AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                       ChatCompletionStreamResponse, ChatLogprobs, ChatStreamChoice, ChatTokenLogprob, DeltaMessage,
                       TopLogprob, Usage)
from .serving import OpenAIServing, Submission, finite


class OpenAIServingChat(OpenAIServing):
    id_prefix = "chatcmpl-"
    prompt_param = "messages"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        registry = getattr(self.metrics, "registry", None)
        self.dropped_calls = None if registry is None else Counter(
            f"{METRICS_PREFIX}_tool_calls_dropped", "Incomplete tool calls left out of replies cut at max_tokens.",
            registry=registry)

    async def create(self, body: ChatCompletionRequest, request: Request):
        self.check_request(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        plan = tool_plan.plan(self.client, body) if tool_plan.uses_tools(body) else None  # sets a call grammar first
        if plan is not None:
            encode = lambda: [tool_plan.prompt_ids(self.client, body, plan.tools)]  # noqa: E731
        else:
            messages = [m.to_dict() for m in body.messages]
            encode = lambda: [self.client.chat_prompt(messages, body.safe_prompt)]  # noqa: E731
        submission = await self.start(body, encode, 1)
        if body.stream:
            if plan is not None and plan.fmt is not None:
                submission.tools = [tool_plan.ToolStream(plan) for _ in submission.requests]
            first = [self._chunk(submission, i, DeltaMessage(role="assistant", content=""))
                     for i in range(len(submission.requests))]
            return self.stream(request, submission, body, first)
        out = await self.collect(request, submission)
        choices = [ChatChoice(index=i, message=message, finish_reason=reason,
                              logprobs=ChatLogprobs(content=self.logprobs(o.logprobs)) if body.logprobs else None)
                   for i, o in enumerate(out)
                   for message, reason in [self._message(plan, submission.requests[i], o)]]
        return ChatCompletionResponse(id=submission.id, created=submission.created, model=submission.model,
                                      choices=choices, usage=Usage.of(submission.prompt_ids, sum(o.tokens for o in out)))

    def _message(self, plan, engine_request, o) -> tuple[AssistantMessage, str]:
        """A finished choice's message and finish reason: tool calls if the reply parses as calls."""
        text = "".join(o.text)
        if plan is None or plan.fmt is None:
            return AssistantMessage(content=text), o.finish_reason
        reply = tool_plan.reply_text(self.client, plan, engine_request.output_ids, text)
        content, calls = tool_plan.parse(plan, reply)
        if calls is None and o.finish_reason == "length":  # cut inside its calls: keep the complete ones
            cut = tool_plan.parse_cut(plan, reply)
            if cut is not None:
                content, calls, dropped = cut
                self._count_dropped(dropped)
                return AssistantMessage(content=content, tool_calls=calls), "length"
        if calls is None:
            return AssistantMessage(content=text), o.finish_reason
        return AssistantMessage(content=content, tool_calls=calls), "tool_calls"

    def _count_dropped(self, n: int) -> None:
        if n and self.dropped_calls is not None:
            self.dropped_calls.inc(n)

    def _chunk(self, submission, index, delta, logprobs=None, finish_reason=None, usage=None, choices=None):
        if choices is None:
            choices = [ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)]
        chunk = ChatCompletionStreamResponse(id=submission.id, object="chat.completion.chunk", created=submission.created,
                                             model=submission.model, system_fingerprint=None, choices=choices)
        if usage is not None:
            chunk.usage = usage
        return chunk

    def chunks(self, submission: Submission, body: ChatCompletionRequest, item: Item) -> list:
        chunks = []
        lp = ChatLogprobs(content=self.logprobs(item.logprobs or [])) if body.logprobs and item.logprobs else None
        if submission.tools is not None:
            return self._tool_chunks(submission, submission.tools[item.choice], item, lp)
        if item.text or lp:
            chunks.append(self._chunk(submission, item.choice, DeltaMessage(content=item.text), lp))
        if item.finish_reason is not None:
            chunks.append(self._chunk(submission, item.choice, DeltaMessage(), None, item.finish_reason))
        return chunks

    def _tool_chunks(self, submission: Submission, stream, item: Item, lp) -> list:
        """A tool-calling choice's chunks: content, or the calls' id and name, then argument fragments."""
        fields = stream.push(item.text, item.token_ids)
        if item.finish_reason is not None:
            fields += stream.finish(cut=item.finish_reason == "length")
            self._count_dropped(stream.dropped)
        if lp is not None and not fields:
            fields = [{}]
        chunks = [self._chunk(submission, item.choice, DeltaMessage(**f), lp if k == 0 else None)
                  for k, f in enumerate(fields)]
        if item.finish_reason is not None:
            reason = "tool_calls" if stream.calls and not stream.dropped else item.finish_reason
            chunks.append(self._chunk(submission, item.choice, DeltaMessage(), None, reason))
        return chunks

    def usage_chunk(self, submission: Submission, usage: Usage):
        return self._chunk(submission, 0, None, usage=usage, choices=[])

    def logprobs(self, entries) -> list[ChatTokenLogprob]:
        def one(token_id, lp):
            return dict(token=self.token_text(token_id), logprob=finite(lp), bytes=list(self.token_bytes(token_id)))

        return [ChatTokenLogprob(**one(e.token_id, e.logprob), top_logprobs=[TopLogprob(**one(i, lp)) for i, lp in e.top])
                for e in entries]
