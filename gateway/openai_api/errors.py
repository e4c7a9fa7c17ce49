"""Every failure as OpenAI's `{"error": {"message", "type", "param", "code"}}` with its HTTP status.

Three sources: the shim's own checks (`OpenAIError` raised anywhere), FastAPI's request
validation (pydantic errors, which FastAPI would send as a 422 in its own shape: mapped to 400
naming the field), and the upstream gRPC server (`GatewayError` from gateway.client, mapped by
its status and stable error code; its field names are translated back to the request's).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from gateway.client import (
    ContextLengthExceededError,
    DeadlineExceededError,
    GatewayError,
    InvalidArgumentError,
    ModelNotFoundError,
    OverloadedError,
    UnauthenticatedError,
    UnavailableError,
)
from gateway.openai_api.schemas import FieldError

log = logging.getLogger("gateway.openai")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RETRY_AFTER_S = "1"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"; never seen by it


class OpenAIError(Exception):
    """An error response: HTTP `status` and OpenAI's four fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_event(self) -> bytes:
        """The error as one SSE event, for a stream whose 200 status has already been sent."""
        return b"data: " + json.dumps(self.body(), ensure_ascii=False).encode() + b"\n\n"


def invalid_param(param: str | None, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, INVALID_REQUEST, param, code)


# ----------------------------------------------------------------------------- from upstream


def from_gateway_error(exc: GatewayError, params: Mapping[str, str]) -> OpenAIError:
    """The HTTP error for a failed upstream call. `params` maps the upstream's field names
    (`sampling.max_tokens`, `messages[0].role`, ...) to this request's parameter names."""
    param = _request_param(exc.field, params)
    if isinstance(exc, ContextLengthExceededError):
        message = exc.message.split("context_length_exceeded: ", 1)[-1]
        return OpenAIError(
            400,
            f"This model's maximum context length was exceeded: {message}",
            INVALID_REQUEST,
            param or params.get("input"),
            "context_length_exceeded",
        )
    if isinstance(exc, ModelNotFoundError):
        return OpenAIError(404, exc.message, INVALID_REQUEST, "model", "model_not_found")
    if isinstance(exc, InvalidArgumentError):
        message = _rename_field_in_message(exc.message, exc.field, param)
        return OpenAIError(400, message, INVALID_REQUEST, param, exc.error_code or "invalid_value")
    if isinstance(exc, OverloadedError) and _message_too_large(exc):
        # gRPC's own message size limit, not the engine's queue: retrying can never succeed.
        return OpenAIError(
            413,
            f"The request is too large for the model server: {exc.message}",
            INVALID_REQUEST,
            None,
            "request_too_large",
        )
    if isinstance(exc, OverloadedError):
        return OpenAIError(
            429,
            f"The model is overloaded (its request queue is full); retry later. ({exc.message})",
            "rate_limit_error",
            None,
            "engine_overloaded",
            {"retry-after": RETRY_AFTER_S},
        )
    if isinstance(exc, UnavailableError):
        return OpenAIError(
            503,
            f"The model server is unavailable: {exc.message}",
            SERVER_ERROR,
            None,
            exc.error_code or "upstream_unavailable",
            {"retry-after": RETRY_AFTER_S},
        )
    if isinstance(exc, UnauthenticatedError):
        # The client cannot fix this: the shim's own upstream key is missing or wrong.
        return OpenAIError(
            502,
            "The model server refused this gateway's API key (--upstream-api-key-file or "
            "GPTQGW_UPSTREAM_API_KEY)",
            SERVER_ERROR,
            None,
            "upstream_unauthenticated",
        )
    if isinstance(exc, DeadlineExceededError):
        return OpenAIError(504, exc.message, SERVER_ERROR, None, "upstream_timeout")
    log.error("upstream error %s: %s", exc.code.name, exc.message)
    return OpenAIError(502, f"Upstream error: {exc.message}", SERVER_ERROR, None, "upstream_error")


def _message_too_large(exc: GatewayError) -> bool:
    """RESOURCE_EXHAUSTED from gRPC itself (a message or its metadata over a limit) rather than
    from the server's full queue, which always sends its error code."""
    if exc.error_code == "overloaded":
        return False
    text = exc.message.lower()
    return "larger than max" in text or "exceeds limit" in text


_INDEXED = re.compile(r"^([A-Za-z_]+)((?:\[\d+\])?)(.*)$")


def _request_param(field: str | None, params: Mapping[str, str]) -> str | None:
    if not field:
        return None
    if field in params:
        return params[field]
    # messages[2].role -> messages[2].role; sampling.top_p -> top_p
    head, index, rest = _INDEXED.match(field).groups()  # type: ignore[union-attr]
    if head == "sampling":
        name = rest.lstrip(".")
        return params.get(f"sampling.{name}", name)
    return params.get(head, head) + index + rest


def _rename_field_in_message(message: str, field: str | None, param: str | None) -> str:
    """The server's messages start with its field name; show the client's name instead."""
    if field and param and message.startswith(f"{field}:"):
        return f"{param}:{message[len(field) + 1 :]}"
    return message


# ----------------------------------------------------------------------------- from FastAPI


# Tags pydantic puts in an error's location for union members and validators, not field names;
# a model member of a union is tagged with its class name (NamedToolChoice: CamelCase).
_TYPE_TAG = re.compile(
    r"^(str|int|float|bool|list|dict|none|literal|function-|constrained-)|[\[\]]"
    r"|^(?:[A-Z][a-z0-9]+){2,}$"
)


def param_from_location(location: Sequence[Any]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"; None for the body as a whole."""
    parts: list[str] = []
    for item in location:
        if item == "body" and not parts:
            continue
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            continue
        if _TYPE_TAG.search(str(item)):
            continue
        parts.append(str(item))
    return ".".join(parts) or None


def validation_error(errors: Sequence[Mapping[str, Any]]) -> OpenAIError:
    """The 400 for FastAPI's validation errors: the first error, naming its field."""
    if not errors:
        return invalid_param(None, "Invalid request body")
    first = _most_specific(errors)
    context_error = (first.get("ctx") or {}).get("error")
    if isinstance(context_error, FieldError):
        return invalid_param(
            context_error.param,
            f"{context_error.param}: {context_error.message}",
            context_error.code,
        )
    kind = first.get("type", "")
    param = param_from_location(first.get("loc", ()))
    if kind == "json_invalid":
        return invalid_param(None, "The request body is not valid JSON", "invalid_json")
    if kind == "extra_forbidden":
        return invalid_param(
            param, f"Unrecognized request argument supplied: {param}", "unknown_parameter"
        )
    if kind == "missing":
        if param is None:
            return invalid_param(None, "A JSON request body is required", "missing_body")
        return invalid_param(
            param, f"Missing required parameter: '{param}'", "missing_required_parameter"
        )
    if param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        return invalid_param(None, "The request body must be a JSON object", "invalid_body")
    message = first.get("msg", "invalid value")
    return invalid_param(param, f"Invalid value for '{param}': {message}")


def _most_specific(errors: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """Of the errors about the first failing field, the deepest one. A union (`stop`: a string
    or a list of strings) fails once per member; the member the value matched in shape goes
    deeper (`stop[1]`: too short) than the others (`stop`: not a string), and says what is wrong."""
    field = param_from_location(errors[0].get("loc", ())) or ""
    top = field.split(".")[0].split("[")[0]
    same_field = [
        error
        for error in errors
        if (param_from_location(error.get("loc", ())) or "").split(".")[0].split("[")[0] == top
    ]

    def depth(error: Mapping[str, Any]) -> int:
        param = param_from_location(error.get("loc", ())) or ""
        return param.count(".") + param.count("[")

    return max(same_field, key=depth)


def install_handlers(app: FastAPI) -> None:
    """Route every error, FastAPI's and Starlette's included, to the OpenAI shape."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = OpenAIError(
            exc.status_code,
            str(exc.detail) if exc.detail else "HTTP error",
            INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR,
            None,
            code,
            exc.headers,
        )
        return error.response()

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody is left to answer; not the server's fault, so no traceback.
        log.info("client disconnected while sending %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(GatewayError)
    async def _gateway(request: Request, exc: GatewayError) -> JSONResponse:
        return from_gateway_error(exc, {}).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return OpenAIError(
            500, f"Internal error: {type(exc).__name__}", SERVER_ERROR, None, "internal_error"
        ).response()
