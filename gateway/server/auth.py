"""API keys: `authorization: Bearer <key>` metadata, checked before any handler runs.

Keys are compared as SHA-256 digests with hmac.compare_digest against every configured key (no
early exit), so the time taken says nothing about how much of a key matched, nor which one, nor
its length. Health checks stay open so that load balancers and kubelets need no key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import grpc

from gateway.server.errors import ERROR_CODE_KEY
from quantize.errors import UserInputError

API_KEYS_ENV = "GPTQGW_API_KEYS"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def load_api_keys(
    path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None
) -> list[str]:
    """Keys from a file (one per line; blank lines and `#` comments skipped) and GPTQGW_API_KEYS
    (comma-separated). An empty list means no authentication."""
    keys: list[str] = [] if path is None else read_key_file(path, "--api-keys-file")
    env_value = (os.environ if environ is None else environ).get(API_KEYS_ENV, "")
    keys.extend(key.strip() for key in env_value.split(",") if key.strip())
    for key in keys:
        if not key.isprintable() or " " in key:
            raise UserInputError("API keys must be printable and without spaces")
    return keys


def read_key_file(path: str | os.PathLike[str], flag: str) -> list[str]:
    """The keys in a file, one per line (blank lines and `#` comments skipped); `flag` names the
    option that gave the path in the errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserInputError(f"{flag} {path}: cannot read it ({exc.strerror})") from exc
    lines = [line.strip() for line in text.splitlines()]
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        raise UserInputError(f"{flag} {path}: holds no key")
    return keys


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid key with UNAUTHENTICATED, except the open methods."""

    def __init__(
        self,
        keys: Iterable[str],
        on_reject: Callable[[str], None] | None = None,
        open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES,
    ) -> None:
        self._digests = [_digest(key) for key in keys]
        if not self._digests:
            raise ValueError("ApiKeyInterceptor needs at least one key")
        self._open_prefixes = open_prefixes
        self._on_reject = on_reject

    def is_authorized(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        token = bearer_token(metadata)
        if token is None:
            return False
        presented = _digest(token)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(self._open_prefixes) or self.is_authorized(
            handler_call_details.invocation_metadata
        ):
            return await continuation(handler_call_details)
        if self._on_reject is not None:
            self._on_reject(method)
        handler = await continuation(handler_call_details)
        return _refusing_handler(handler)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


_MESSAGE = "missing or invalid API key: send metadata `authorization: Bearer <key>`"


async def _refuse(request: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        _MESSAGE,
        trailing_metadata=((ERROR_CODE_KEY, "unauthenticated"),),
    )


def _refusing_handler(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """A handler of the same shape as `handler` that refuses the call (None: unknown method)."""
    if handler is None:
        return None
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_refuse, **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_refuse, **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_refuse, **codec)
    return grpc.stream_stream_rpc_method_handler(_refuse, **codec)
