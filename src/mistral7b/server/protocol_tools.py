"""Request and response models of tool calling and structured outputs (`tools`, `tool_choice`,
`response_format`, `message.tool_calls`, `delta.tool_calls`), re-exported by protocol.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    # strict: no "1" -> 1 or true -> 1 coercion; no NaN/inf; an unknown field is refused, never ignored.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value):
        # JSON's "\ud800" escape decodes to a lone surrogate, which no tokenizer or UTF-8 encoder takes.
        if _has_lone_surrogate(value):
            raise ValueError("contains a lone UTF-16 surrogate (such as \\ud800), which is not valid Unicode text")
        return value


def _has_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_lone_surrogate(v) for v in value)
    return False


# ---- requests ----------------------------------------------------------------------------------


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(description="the arguments object as JSON text")


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class JsonSchemaFormat(_Strict):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="the JSON schema the output follows")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema_of(self) -> dict | None:
        """The JSON schema the output must follow (None for plain text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "object"}
        if self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
        return self.json_schema.schema_ if self.json_schema.schema_ is not None else {}


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction



# ---- responses ---------------------------------------------------------------------------------


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A streamed call: its index, id, type and name first, then argument fragments (index only)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None
