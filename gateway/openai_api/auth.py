"""API keys for the REST endpoints: `Authorization: Bearer <key>`, as OpenAI's SDK sends it.

Keys are compared as SHA-256 digests against every configured key with hmac.compare_digest (no
early exit), as the gRPC server does, so timing reveals neither how much of a key matched nor
which one. With no key configured every request is let through.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.openai_api.errors import INVALID_REQUEST, OpenAIError

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API key from the server's --api-keys-file, when it has one.",
)


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(key) for key in keys]

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def accepts(self, key: str) -> bool:
        presented = _digest(key)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def check_api_key(request: Request) -> None:
    """401 in OpenAI's shape unless the request carries a configured key (when any is)."""
    keys: ApiKeys = request.app.state.api_keys
    if not keys.required:
        return
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise OpenAIError(
            401,
            "You didn't provide an API key: send the header `Authorization: Bearer <key>`.",
            INVALID_REQUEST,
            None,
            "missing_api_key",
            {"www-authenticate": "Bearer"},
        )
    if not keys.accepts(token):
        raise OpenAIError(
            401,
            "Incorrect API key provided.",
            INVALID_REQUEST,
            None,
            "invalid_api_key",
            {"www-authenticate": "Bearer"},
        )


async def require_api_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Security(bearer_scheme),  # noqa: B008
) -> None:
    """The same check as a FastAPI dependency, which also documents the scheme in OpenAPI."""
    check_api_key(request)
