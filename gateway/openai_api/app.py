"""The ASGI app: OpenAI's /v1 endpoints, probes and metrics, over the gRPC server.

    app = create_app(ShimConfig(upstream="127.0.0.1:50051"))

The gRPC client is created in the app's lifespan (grpc.aio channels belong to the event loop
that runs them), so the app must be served by an ASGI server that runs the lifespan (uvicorn does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from gateway.client import AsyncGatewayClient, GatewayError
from gateway.openai_api import schemas, tokenize
from gateway.openai_api.auth import ApiKeys, check_api_key, require_api_key
from gateway.openai_api.body import parse_body
from gateway.openai_api.errors import SERVER_ERROR, OpenAIError, install_handlers
from gateway.openai_api.metrics import MetricsMiddleware, ShimMetrics
from gateway.openai_api.service import Shim

OWNED_BY = "gptq-gateway"
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
READY_TIMEOUT_S = 2.0
# Reconnect quickly when the server comes back (grpc's default backoff grows to two minutes,
# during which /ready would keep failing for a server that is already up again).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30000),
)


@dataclass
class ShimConfig:
    upstream: str  # HOST:PORT of `gptq-gateway serve`
    api_keys: list[str] = field(default_factory=list)  # none: no authentication
    upstream_api_key: str | None = None
    # Bodies past this are refused with 413 (body.py); the default matches the gRPC server's
    # default message size limit, past which the upstream would refuse the request anyway.
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    default_max_tokens: int | None = None  # for chat requests without one; None: OpenAI's


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": schemas.ErrorResponse} for status in statuses}


_GENERATION_ERRORS = _errors(400, 401, 404, 413, 429, 500, 502, 503)
# Before OpenAPI 3.2, a text/event-stream `schema` describes one event, in the field names
# that 3.2's `itemSchema` uses for SSE: every event here is `data: <chunk JSON | [DONE]>`.
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}
_SSE_RESPONSE = {
    "content": {"text/event-stream": {"schema": _SSE_EVENT}},
    "description": schemas.SSE_DESCRIPTION,
}

v1 = APIRouter(prefix="/v1")
# The generation endpoints check the key and parse the body themselves (body.py says why); this
# is how the schema still documents both.
_REQUEST_BODIES = (
    schemas.ChatCompletionRequest,
    schemas.CompletionRequest,
    tokenize.TokenizeRequest,
    tokenize.DetokenizeRequest,
)


def _generation_openapi(body_model: type) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{body_model.__name__}"}
                }
            },
        },
        "security": [{"HTTPBearer": []}],
    }


def _shim(request: Request) -> Shim:
    return request.app.state.shim


@v1.post(
    "/chat/completions",
    response_model=None,
    responses={200: {"model": schemas.ChatCompletion, **_SSE_RESPONSE}, **_GENERATION_ERRORS},
    openapi_extra=_generation_openapi(schemas.ChatCompletionRequest),
    summary="Chat completion (messages through the model's chat template)",
)
async def chat_completions(request: Request) -> Response:
    check_api_key(request)
    body = await parse_body(
        request, schemas.ChatCompletionRequest, request.app.state.max_request_bytes
    )
    return await _shim(request).chat(body, request)


@v1.post(
    "/completions",
    response_model=None,
    responses={200: {"model": schemas.Completion, **_SSE_RESPONSE}, **_GENERATION_ERRORS},
    openapi_extra=_generation_openapi(schemas.CompletionRequest),
    summary="Text completion",
)
async def completions(request: Request) -> Response:
    check_api_key(request)
    body = await parse_body(request, schemas.CompletionRequest, request.app.state.max_request_bytes)
    return await _shim(request).completions(body, request)


_TOKENIZE_ERRORS = _errors(400, 401, 404, 413, 500, 502, 503)


@v1.post(
    "/tokenize",
    response_model=None,
    responses={200: {"model": tokenize.TokenizeResponse}, **_TOKENIZE_ERRORS},
    openapi_extra=_generation_openapi(tokenize.TokenizeRequest),
    summary="Token ids of a prompt, or of messages through the chat template (vLLM's shape)",
)
async def tokenize_endpoint(request: Request) -> JSONResponse:
    check_api_key(request)
    body = await parse_body(request, tokenize.TokenizeRequest, request.app.state.max_request_bytes)
    return JSONResponse(await _shim(request).tokenize(body))


@v1.post(
    "/detokenize",
    response_model=None,
    responses={200: {"model": tokenize.DetokenizeResponse}, **_TOKENIZE_ERRORS},
    openapi_extra=_generation_openapi(tokenize.DetokenizeRequest),
    summary="Text of token ids, special tokens included (vLLM's shape)",
)
async def detokenize_endpoint(request: Request) -> JSONResponse:
    check_api_key(request)
    body = await parse_body(
        request, tokenize.DetokenizeRequest, request.app.state.max_request_bytes
    )
    return JSONResponse(await _shim(request).detokenize(body))


def _model_entry(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}


@v1.get(
    "/models",
    response_model=None,
    dependencies=[Depends(require_api_key)],
    responses={200: {"model": schemas.ModelList}, **_errors(401, 502, 503)},
    summary="The served models",
)
async def list_models(request: Request) -> JSONResponse:
    shim = _shim(request)
    cards = await shim.models()
    data = [_model_entry(card.name, shim.started_at) for card in cards]
    return JSONResponse({"object": "list", "data": data})


@v1.get(
    "/models/{model}",
    response_model=None,
    dependencies=[Depends(require_api_key)],
    responses={200: {"model": schemas.ModelCard}, **_errors(401, 404, 502, 503)},
    summary="One served model",
)
async def retrieve_model(model: str, request: Request) -> JSONResponse:
    shim = _shim(request)
    for card in await shim.models():
        if card.name == model:
            return JSONResponse(_model_entry(card.name, shim.started_at))
    raise OpenAIError(
        404, f"The model {model!r} does not exist", param="model", code="model_not_found"
    )


probes = APIRouter()


@probes.get(
    "/health",
    response_model=schemas.Status,
    response_model_exclude_none=True,
    summary="Liveness: the shim answers",
)
async def health() -> dict[str, str]:
    return {"status": "ok"}


@probes.get(
    "/ready",
    response_model=schemas.Status,
    response_model_exclude_none=True,
    responses=_errors(503),
    summary="Readiness: the gRPC server reports SERVING",
)
async def ready(request: Request) -> dict[str, str]:
    try:
        state = await _shim(request).client.health("gptqgw.v1.Gateway", timeout=READY_TIMEOUT_S)
    except GatewayError as exc:
        state = exc.code.name
    if state != "SERVING":
        raise OpenAIError(
            503,
            f"The model server is not serving (health: {state})",
            SERVER_ERROR,
            None,
            "upstream_not_ready",
            {"retry-after": "1"},
        )
    return {"status": "ready", "upstream": state}


@probes.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics of the shim",
)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def create_app(config: ShimConfig) -> FastAPI:
    shim_metrics = ShimMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = AsyncGatewayClient(
            config.upstream, api_key=config.upstream_api_key, options=CHANNEL_OPTIONS
        )
        app.state.shim = Shim(client, shim_metrics, config.default_max_tokens)
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(
        title="gptq-gateway OpenAI-compatible API",
        summary="OpenAI's chat completions, completions and models endpoints over the "
        "gptq-gateway gRPC server.",
        version="1",
        lifespan=lifespan,
    )
    app.state.api_keys = ApiKeys(config.api_keys)
    app.state.max_request_bytes = config.max_request_bytes
    app.state.metrics = shim_metrics
    install_handlers(app)
    app.include_router(v1)
    app.include_router(probes)
    app.add_middleware(MetricsMiddleware, metrics=shim_metrics)
    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]
    return app


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents a 422 with its own error shape on every route; this API sends 400 in
    OpenAI's shape instead (errors.py), so the schema must say so."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            routes=app.routes,
        )
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                responses = operation.get("responses", {})
                framework = responses.pop("422", None)
                if framework is not None and "400" not in responses:
                    responses["400"] = {
                        "description": "Invalid request",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ErrorResponse"}
                            }
                        },
                    }
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for model in _REQUEST_BODIES:
            document = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(document.pop("$defs", {}))
            components[model.__name__] = document
        app.openapi_schema = schema
    return app.openapi_schema
