"""The OpenAI API's request and response bodies, as static pydantic models (after vLLM's
`entrypoints/openai/protocol.py`). Handlers return these models, so each shape is written once and the
OpenAPI schema carries it. Limits that depend on the model served (the context, the vocabulary) are
checked by `OpenAIServing.check_limits` and written into the schema by `app.openapi_with_limits`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, PrivateAttr, field_validator

from ..sampling import SamplingParams
from ..tokenizer.chat import ROLE_ALIASES, ROLES
from .protocol_tools import (DeltaFunctionCall, DeltaToolCall, FunctionCall, FunctionDefinition,  # noqa: F401
                             JsonSchemaFormat, NamedFunction, NamedToolChoice, ResponseFormat, ResponseFunctionCall,
                             ResponseToolCall, Tool, ToolCall, _Strict)

MAX_N = 16  # choices per request
MAX_PROMPTS = 256  # prompts in one /v1/completions request
MAX_STOP = 16
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal[ROLES + tuple(ROLE_ALIASES)]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant message's calls")
    tool_call_id: str | None = Field(None, description="a tool message: the id of the call it answers")

    def to_dict(self) -> dict:
        """The message as the tokenizer's chat formats take it: plain text content, canonical role."""
        content = self.content
        if content is None:
            content = ""
        elif isinstance(content, list):
            content = "".join(part.text for part in content)
        d = {"role": ROLE_ALIASES.get(self.role, self.role), "content": content}
        if self.name is not None:
            d["name"] = self.name
        if self.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


ToolList = Annotated[list[Tool], Field(max_length=128)]
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class SamplingRequest(_Strict):
    model: str = Field(description="the model name, as /v1/models lists it")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions
    top_k: int | None = Field(None, ge=-1, description="extension; 0 or -1 = off")
    min_p: float | None = Field(None, ge=0, le=1, description="extension")
    repetition_penalty: float | None = Field(None, gt=0, le=100, description="extension (HF style)")
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-sequence tokens")
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: constrain the output")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (as a string) -> bias added to its logit before sampling")
    # A grammar set by the server itself (tool_choice "required" or a named function), never by the client.
    _grammar: str | None = PrivateAttr(None)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def logprobs_wanted(self) -> int | None:
        """Top log-probabilities per token, or None for none."""
        raise NotImplementedError

    def to_sampling_params(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        """The engine's parameters for choice number `choice`; each choice gets its own seed."""
        seed = self.seed
        if seed is not None and choice:
            seed = ((seed + choice + (1 << 63)) % (1 << 64)) - (1 << 63)
        top_k = self.top_k or 0
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if top_k < 0 else top_k,
            min_p=self.min_p or 0.0,
            max_tokens=max_tokens,
            stop=self.stop,
            seed=seed,
            logprobs=self.logprobs_wanted(),
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            ignore_eos=self.ignore_eos,
            logit_bias=self.token_biases(),
            **self.constraint(),
        )

    def token_biases(self) -> dict[int, float] | None:
        """logit_bias with integer token ids (the keys are checked by `_bias_keys`)."""
        return {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None

    @field_validator("logit_bias", mode="after")
    @classmethod
    def _bias_keys(cls, value):
        for key in value or ():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"the key {key!r} is not a token id (a non-negative integer, as a string)")
        return value

    def constraint(self) -> dict:
        """SamplingParams' structured-output field for response_format or the server's tool grammar."""
        if self._grammar is not None:
            return {"grammar": self._grammar}
        schema = self.response_format.schema_of() if self.response_format is not None else None
        return {} if schema is None else {"json_schema": schema}


class CompletionRequest(SamplingRequest):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="a string, a list of strings, a list of token ids, or a list of token-id lists")
    logprobs: int | None = Field(None, ge=0, le=20, description="how many top log-probabilities per token")
    echo: bool = Field(False, description="prepend the prompt's text to the completion")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1: each choice is one sampled sequence")
    split_special_tokens: bool = Field(False, description="extension: special-token text in a string prompt "
                                       "(<|im_end|>) is plain text, not the control token")

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def to_sampling_params(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        params = super().to_sampling_params(max_tokens, choice)
        if self.echo and self.logprobs is not None:  # the echoed prompt's tokens get logprobs too (vLLM)
            params.prompt_logprobs = self.logprobs
        return params

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value):
        """Say what is wrong with a prompt in its own terms (pydantic would list every arm of the union)."""
        problem = prompt_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    def prompts(self) -> list:
        """The prompts: one string or token-id list each."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


def _token_id_problem(ids: list, where: str) -> str | None:
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            return f"{where}token id {t!r} at index {i} is not a token id (a non-negative integer)"
    return None


def prompt_problem(value) -> str | None:
    """What is wrong with a /v1/completions prompt's shape, or None."""
    if isinstance(value, str):
        return None
    shape = "a string, a list of strings, a list of token ids, or a list of token-id lists"
    if not isinstance(value, list):
        return f"must be {shape}"
    if not value:
        return "the list is empty"
    if all(isinstance(p, str) for p in value):
        return None
    if all(isinstance(p, list) for p in value):
        for j, ids in enumerate(value):
            problem = "is an empty token-id list" if not ids else _token_id_problem(ids, "")
            if problem is not None:
                return f"prompt {j} {problem}" if not ids else f"prompt {j}: {problem}"
        return None
    if any(isinstance(p, (str, list)) for p in value):
        return f"mixes strings, lists and numbers; it must be {shape}"
    return _token_id_problem(value, "")


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    safe_prompt: bool = Field(False, description="extension: prepend Mistral's guardrail system prompt")
    tools: ToolList | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: 'auto' with tools, else 'none'")
    parallel_tool_calls: bool = True

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- responses -------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


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

    @classmethod
    def of(cls, prompt_ids: list[list[int]], n_completion: int) -> "Usage":
        n_prompt = sum(len(ids) for ids in prompt_ids)
        return cls(prompt_tokens=n_prompt, completion_tokens=n_completion, total_tokens=n_prompt + n_completion)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mistral7b"
    max_model_len: int | None = None
    root: str | None = None  # a LoRA adapter's folder (vLLM's field)
    parent: str | None = None  # a LoRA adapter's base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    running: int
    waiting: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class _ResponseHead(BaseModel):
    """The fields every completion object opens with; `object` names its kind."""

    id: str
    object: str
    created: int
    model: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class CompletionResponse(_ResponseHead):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionStreamResponse(_ResponseHead):
    """One Server-Sent Event of a streamed completion (`usage` only in the last, when asked for)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


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
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(_ResponseHead):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionStreamResponse(_ResponseHead):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


# ---- /tokenize and /detokenize (vLLM's shapes) -------------------------------------------------------


class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(True, description="prepend BOS, as /v1/completions does")
    split_special_tokens: bool = Field(False, description="as /v1/completions' option")


class TokenizeChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    tools: ToolList | None = Field(None, description="rendered into the prompt as /v1/chat/completions does")


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str
