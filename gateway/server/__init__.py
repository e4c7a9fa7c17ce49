"""The async gRPC server (`gptq-gateway serve`): the gptqgw.v1.Gateway service over the engine,
with health, reflection, API keys, metrics and a graceful drain. See app.py for the lifecycle."""

from gateway.server.app import GatewayServer, ServerConfig, run
from gateway.server.convert import EngineTypes, load_engine_types

__all__ = ["EngineTypes", "GatewayServer", "ServerConfig", "load_engine_types", "run"]
