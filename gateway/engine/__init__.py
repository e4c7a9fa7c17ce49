"""The generation engine: continuous batching over a model runner, sampling, incremental
detokenization and stop strings, driven from asyncio (`Engine.generate` -> async iterator).

See docs/ARCHITECTURE.md, contract 3.
"""

from gateway.engine.engine import Engine, EngineConfig
from gateway.engine.errors import (
    ContextLengthExceeded,
    EngineError,
    EngineOverloaded,
    EngineStopped,
    InvalidParameter,
    KVCacheTooSmall,
)
from gateway.engine.params import SamplingParams
from gateway.engine.stream import RequestStream
from gateway.engine.types import (
    EngineStats,
    GenerationRequest,
    ModelInfo,
    Timings,
    TokenEvent,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__all__ = [
    "ContextLengthExceeded",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineOverloaded",
    "EngineStats",
    "EngineStopped",
    "GenerationRequest",
    "InvalidParameter",
    "KVCacheTooSmall",
    "ModelInfo",
    "RequestStream",
    "SamplingParams",
    "Timings",
    "TokenEvent",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
]
