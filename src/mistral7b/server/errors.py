"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure path:
raised `APIError`s, request validation, unknown routes and methods, and pure-ASGI middleware."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ErrorDetail, ErrorResponse

log = logging.getLogger("mistral7b.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
          429: "rate_limit_exceeded"}
# Documented on every /v1 operation.
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429)}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))


class BodyTooLarge(StarletteHTTPException):
    """Raised from inside `receive`; an HTTPException so FastAPI's body reader passes it through."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


def error_response(status: int, message: str, type: str | None = None, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = code if code is not None else _CODES.get(status)
    # The message may quote the request (a field name, a model): lone surrogates cannot be encoded as UTF-8.
    message, param = _encodable(message), _encodable(param)
    body = APIError(status, message, type, param, code).body()
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _encodable(text: str | None) -> str | None:
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


async def send_error(send, status: int, message: str, headers: dict[str, str] | None = None, **kw) -> None:
    """Send an OpenAI-shaped error from a pure ASGI middleware."""
    response = error_response(status, message, headers=headers, **kw)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive():  # pragma: no cover - JSONResponse never reads
    return {"type": "http.disconnect"}


def validation_message(errors) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors, in the words OpenAI uses."""
    if not errors:
        return "invalid request", None
    errors = _meant_arm(errors)
    # In a union (a prompt, a message's content), the arm whose type matched says what is wrong, not the
    # type mismatches of the other arms.
    e = next((e for e in errors if not e.get("type", "").endswith("_type")), errors[0])
    loc = [str(p) for p in e.get("loc", ()) if p != "body" and not _union_arm(str(p))]
    if e.get("type") == "json_invalid":
        return f"We could not parse the JSON body of your request: {e.get('ctx', {}).get('error', 'invalid JSON')}", None
    param = loc[0] if loc else None
    where = ".".join(loc)
    msg = e.get("msg", "invalid value").removeprefix("Value error, ")
    if e.get("type") == "missing":
        if not loc:
            return "The request body is empty: send a JSON object.", None
        return f"Missing required parameter: '{where}'.", param
    if e.get("type") == "string_unicode":  # a key (or value) pydantic cannot read as text
        msg = "contains a lone UTF-16 surrogate (such as \\ud800), which is not valid Unicode text"
        return (f"Invalid value for '{where}': {msg}" if where else f"The request {msg}"), param
    if e.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: '{where}' (this server does not support it).", param
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"Invalid value for '{where}': {msg}{more}" if where else msg + more, param


def _meant_arm(errors) -> list:
    """For a body that is a union of models (/tokenize: a prompt, or messages), the errors of the model
    the client meant: the one with the fewest missing or unknown fields (the first on a tie)."""
    arms: dict = {}
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        arms.setdefault(loc[0] if loc and loc[0][:1].isupper() else None, []).append(e)
    if len(arms) < 2 or None in arms:
        return errors
    return min(arms.values(), key=lambda es: sum(e.get("type") in ("missing", "extra_forbidden") for e in es))


def _union_arm(segment: str) -> bool:
    """A location segment that names a union's arm (`str`, `list[TextPart]`, a model), not a field."""
    return (segment in {"str", "int", "float", "bool", "dict", "list"} or "[" in segment or "(" in segment
            or segment[:1].isupper())


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
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
