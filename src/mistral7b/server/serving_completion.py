"""`POST /v1/completions` (after vLLM's `serving_completion.py`)."""

from __future__ import annotations

from fastapi import Request

from .driver import Item
from ..engine.request import TokenLogprob
from .protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                       CompletionStreamResponse, Usage)
from .serving import OpenAIServing, Submission, finite


class OpenAIServingCompletion(OpenAIServing):
    id_prefix = "cmpl-"
    default_max_tokens = 16  # OpenAI's default for /v1/completions
    prompt_param = "prompt"

    async def create(self, body: CompletionRequest, request: Request):
        self.check_request(body)
        prompts = body.prompts()
        submission = await self.start(body, lambda: [self.encode(p, body.split_special_tokens) for p in prompts],
                                      len(prompts))
        echoes = self.echoes(body, prompts, submission)
        want_lp = body.logprobs is not None
        if body.stream:
            # The echo goes out with each choice's first tokens: its prompt logprobs exist after prefill.
            submission.offsets = [0] * len(submission.requests)
            submission.echoes = echoes if body.echo else None
            return self.stream(request, submission, body)
        out = await self.collect(request, submission)
        choices = [CompletionChoice(index=i, text=echoes[i] + "".join(o.text), finish_reason=o.finish_reason,
                                    logprobs=self.logprobs(self.echoed(body, r) + o.logprobs, 0) if want_lp else None)
                   for i, (o, r) in enumerate(zip(out, submission.requests))]
        return CompletionResponse(id=submission.id, created=submission.created, model=submission.model,
                                  choices=choices, usage=Usage.of(submission.prompt_ids, sum(o.tokens for o in out)))

    def encode(self, prompt, split_special_tokens: bool) -> list[int]:
        """A prompt's ids; special-token text in a string is the control token unless split (as vLLM)."""
        if split_special_tokens and isinstance(prompt, str) and self.tokenizer is not None:
            return self.tokenizer.encode(prompt, bos=True, special=False)
        return self.client.encode_prompt(prompt)

    @staticmethod
    def echoed(body: CompletionRequest, engine_request) -> list:
        """The prompt's logprob entries for an echo with logprobs (the first token has none), else []."""
        if not (body.echo and engine_request.prompt_logprobs):
            return []
        first = TokenLogprob(engine_request.prompt_ids[0], None, None)
        return [first] + engine_request.prompt_logprobs[1:]

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
        chunks = []
        if submission.echoes is not None and submission.echoes[item.choice] is not None:
            echo, submission.echoes[item.choice] = submission.echoes[item.choice], None
            entries = self.echoed(body, submission.requests[item.choice])
            chunks.append(self._stream_chunk(submission, CompletionChoice(
                index=item.choice, text=echo, logprobs=self.logprobs(entries, 0) if want_lp else None,
                finish_reason=None)))
            submission.offsets[item.choice] = len(echo)
        lp = self.logprobs(item.logprobs or [], submission.offsets[item.choice]) if want_lp else None
        submission.offsets[item.choice] += len(item.text)
        choice = CompletionChoice(index=item.choice, text=item.text, logprobs=lp, finish_reason=item.finish_reason)
        return chunks + [self._stream_chunk(submission, choice)]

    def _stream_chunk(self, submission: Submission, choice: CompletionChoice) -> CompletionStreamResponse:
        return CompletionStreamResponse(id=submission.id, object="text_completion", created=submission.created,
                                        model=submission.model, choices=[choice])

    def usage_chunk(self, submission: Submission, usage: Usage):
        return CompletionStreamResponse(id=submission.id, object="text_completion", created=submission.created,
                                        model=submission.model, choices=[], usage=usage)

    def logprobs(self, entries, offset: int) -> CompletionLogprobs:
        """`text_offset` counts the characters of the text as detokenized, so a token inside a
        character (its text "bytes:...") adds none and the one that completes it adds it."""
        tokens, token_lps, tops, offsets = [], [], [], []
        decoder = self.tokenizer.decoder() if self.tokenizer is not None else None
        for e in entries:
            tokens.append(self.token_text(e.token_id))
            token_lps.append(None if e.logprob is None else finite(e.logprob))  # an echoed first token
            tops.append(None if e.top is None else {self.token_text(i): finite(lp) for i, lp in e.top})
            offsets.append(offset)
            offset += len(decoder.push(e.token_id)) if decoder is not None else 0
        return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets)

