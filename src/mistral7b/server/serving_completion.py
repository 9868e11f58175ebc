"""`POST /v1/completions` (after vLLM's `serving_completion.py`)."""

from __future__ import annotations

from fastapi import Request

from .driver import Item
from .errors import APIError
from .protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                       CompletionStreamResponse, Usage)
from .serving import OpenAIServing, Submission, finite


class OpenAIServingCompletion(OpenAIServing):
    id_prefix = "cmpl-"
    default_max_tokens = 16  # OpenAI's default for /v1/completions
    prompt_param = "prompt"

    async def create(self, body: CompletionRequest, request: Request):
        self.check_request(body)
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo together with logprobs (the prompt's log-probabilities) is not supported",
                           param="echo")
        prompts = body.prompts()
        submission = await self.start(body, lambda: [self.llm.encode_prompt(p) for p in prompts], len(prompts))
        echoes = self.echoes(body, prompts, submission)
        if body.stream:
            submission.offsets = [len(e) for e in echoes]
            first = [CompletionStreamResponse(id=submission.id, object="text_completion", created=submission.created,
                                              model=self.model_name, choices=[CompletionChoice(
                                                  index=i, text=e, logprobs=None, finish_reason=None)])
                     for i, e in enumerate(echoes) if e]
            return self.stream(request, submission, body, first)
        out = await self.collect(request, submission)
        want_lp = body.logprobs is not None
        choices = [CompletionChoice(index=i, text=echoes[i] + "".join(o.text), finish_reason=o.finish_reason,
                                    logprobs=self.logprobs(o.logprobs, 0) if want_lp else None)
                   for i, o in enumerate(out)]
        return CompletionResponse(id=submission.id, created=submission.created, model=self.model_name,
                                  choices=choices, usage=Usage.of(submission.prompt_ids, sum(o.tokens for o in out)))

    def echoes(self, body: CompletionRequest, prompts: list, submission: Submission) -> list[str]:
        """Each choice's echoed prompt text ("" without echo): the prompt string, or its ids decoded."""
        if not body.echo:
            return [""] * len(submission.requests)
        texts = [p if isinstance(p, str) else self.tokenizer.decode(p) if self.tokenizer is not None else ""
                 for p in prompts]
        return [texts[i // body.n] for i in range(len(submission.requests))]

    def chunks(self, submission: Submission, body: CompletionRequest, item: Item) -> list:
        want_lp = body.logprobs is not None
        # Without a tokenizer there is no text: still send one (empty) chunk per token, so clients see progress.
        if not (item.text or item.finish_reason or (want_lp and item.logprobs) or self.tokenizer is None):
            return []
        lp = self.logprobs(item.logprobs or [], submission.offsets[item.choice]) if want_lp else None
        submission.offsets[item.choice] += len(item.text)
        choice = CompletionChoice(index=item.choice, text=item.text, logprobs=lp, finish_reason=item.finish_reason)
        return [CompletionStreamResponse(id=submission.id, object="text_completion", created=submission.created,
                                         model=self.model_name, choices=[choice])]

    def usage_chunk(self, submission: Submission, usage: Usage):
        return CompletionStreamResponse(id=submission.id, object="text_completion", created=submission.created,
                                        model=self.model_name, choices=[], usage=usage)

    def logprobs(self, entries, offset: int) -> CompletionLogprobs:
        tokens, token_lps, tops, offsets = [], [], [], []
        for e in entries:
            t = self.token_text(e.token_id)
            tokens.append(t)
            token_lps.append(finite(e.logprob))
            tops.append({self.token_text(i): finite(lp) for i, lp in e.top})
            offsets.append(offset)
            offset += len(t)
        return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets)

