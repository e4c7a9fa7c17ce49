"""OpenAI-compatible REST shim over the gRPC server (`gptq-gateway openai`).

Named `openai_api`, not `openai`, so that it never shadows the OpenAI SDK. It reaches the model
only through gateway.client's AsyncGatewayClient; see app.py for the endpoints and server.py for
how it is served.
"""

from gateway.openai_api.app import ShimConfig, create_app

__all__ = ["ShimConfig", "create_app"]
