"""Reading a JSON request body into its pydantic model, by hand.

The generation endpoints parse their bodies here rather than through FastAPI's body parameters:
FastAPI's dependency machinery costs a few hundred microseconds per request on a small CPU,
which lands directly on the time to first token. The OpenAPI schema still documents the same
models (app.py adds them), so the fuzz tests keep the schema and this parser in agreement.

Whatever the bytes, the answer is a 4xx in OpenAI's shape: a body over the size limit is a 413
(refused from its Content-Length, or as soon as a chunked body passes the limit, without reading
the rest), nesting too deep for the parser and text that is not Unicode (lone surrogates, which
Python's json lets through and protobuf cannot encode) are 400s.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from gateway.openai_api.errors import OpenAIError, invalid_param, validation_error

Model = TypeVar("Model", bound=BaseModel)

# Cheap pre-check: a surrogate can only come from a \uD800-\uDFFF escape or from the raw bytes
# ED A0..BF xx (json.loads decodes bytes with "surrogatepass"). Bodies without either skip the walk.
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def request_too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"The request body is larger than this server's limit of {limit} bytes",
        param=None,
        code="request_too_large",
        headers={"connection": "close"},
    )


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise invalid_param(None, "Content-Length is not a number", "invalid_content_length")
        if int(declared) > limit:
            raise request_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a chunked body (or a lying Content-Length): stop reading now
            raise request_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except RecursionError:
        raise invalid_param(
            None, "The request body is nested too deeply to parse", "invalid_json"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise invalid_param(None, "The request body is not valid JSON", "invalid_json") from None
    if _MAYBE_SURROGATE.search(raw):
        check_unicode(data)
    return data


def check_unicode(data: Any) -> None:
    """400 naming the first field whose key or value holds a lone surrogate. Iterative, so that
    a deeply nested body cannot exhaust the stack here either."""
    pending: list[tuple[str | None, Any]] = [(None, data)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise _not_unicode(path)
        elif isinstance(value, dict):
            for key, item in value.items():
                child = key if path is None else f"{path}.{key}"
                if _SURROGATE.search(key):
                    raise _not_unicode(path)
                pending.append((child, item))
        elif isinstance(value, list):
            pending.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


def _not_unicode(param: str | None) -> OpenAIError:
    where = f"'{param}'" if param else "The request body"
    return invalid_param(
        param,
        f"{where} contains a lone surrogate (\\ud800-\\udfff or its bytes), which is not valid "
        "Unicode text",
        "invalid_unicode",
    )


async def parse_body(request: Request, model: type[Model], limit: int) -> Model:
    raw = await read_limited(request, limit)
    if not raw.strip():
        raise invalid_param(None, "A JSON request body is required", "missing_body")
    data = decode_json(raw)
    if not isinstance(data, dict):
        raise invalid_param(None, "The request body must be a JSON object", "invalid_body")
    try:
        return model.model_validate(data)
    except RecursionError:
        raise invalid_param(None, "The request body is nested too deeply", "invalid_body") from None
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
