"""`POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info` (after vLLM's `serving_tokenization.py`). For messages the ids
are exactly those `/v1/chat/completions` runs: the same `LLM.chat_prompt` (or, with tools, `tool_plan.prompt_ids`)
renders them."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from ..tokenizer import check_roles
from . import tool_plan
from .errors import APIError
from .protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest,
                       TokenizeResponse)


class OpenAIServingTokenization:
    def __init__(self, client, models):
        """`client`: the EngineClient (its tokenizer, prompts and model facts); `models`: the served names
        (serving_models.ServedModels)."""
        self.client, self.models, self.tokenizer = client, models, client.tokenizer

    # Read when asked: an engine in its own process reports them once it has loaded the model.
    @property
    def max_model_len(self) -> int:
        return self.client.model_info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.client.model_info.vocab_size

    def _check(self, model: str | None) -> None:
        if model is not None:
            self.models.resolve(model)  # an adapter shares the base model's tokenizer
        if self.tokenizer is None:
            raise APIError(400, "this checkpoint has no tokenizer")

    def _render(self, body) -> list[int]:
        if isinstance(body, TokenizeCompletionRequest):
            return self.tokenizer.encode(body.prompt, bos=body.add_special_tokens, special=not body.split_special_tokens)
        if tool_plan.uses_tools(body):
            return tool_plan.prompt_ids(self.client, body, [t.model_dump(exclude_none=True) for t in body.tools or []],
                                    body.add_generation_prompt)
        messages = [m.to_dict() for m in body.messages]
        if body.add_generation_prompt:
            return self.client.chat_prompt(messages)
        check_roles(messages)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=False)

    async def tokenize(self, body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        self._check(body.model)
        param = "prompt" if isinstance(body, TokenizeCompletionRequest) else "messages"
        if param == "messages" and tool_plan.uses_tools(body):
            tool_plan.check_tool_format(self.tokenizer)
        try:
            ids = await run_in_threadpool(self._render, body)
        except (ValueError, TypeError, UnicodeError) as e:
            raise APIError(400, f"invalid {param}: {e}", param=param) from None
        return TokenizeResponse(tokens=list(ids), count=len(ids), max_model_len=self.max_model_len)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self._check(body.model)
        for i, t in enumerate(body.tokens):
            if t >= self.vocab_size:
                raise APIError(400, f"tokens[{i}] = {t} is not a token id: the vocabulary has {self.vocab_size} "
                               f"ids (0..{self.vocab_size - 1})", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))

    def tokenizer_info(self) -> dict:
        """What lm-eval's `remote` tokenizer backend reads (the keys of vLLM's answer that it uses): with
        this and /tokenize, `lm_eval --model local-completions` needs no tokenizer files of its own."""
        self._check(None)
        t = self.tokenizer
        return {"tokenizer_class": type(t).__name__, "bos_token": t.bos_token or None,
                "eos_token": t.eos_token or None, "pad_token": None, "chat_template": t.chat_template,
                "model_max_length": self.max_model_len}
