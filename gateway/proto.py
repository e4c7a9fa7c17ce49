"""The generated gRPC modules of `gptqgw.v1`, imported from one place.

native/build.rs compiles proto/ at build time with `-I proto` into gateway/proto_gen/, so the
messages live in `gateway.proto_gen.gptqgw.v1.gateway_pb2`. protoc writes the service module's
import of its sibling relative to that -I root (`from gptqgw.v1 import gateway_pb2`); rather than
put gateway/proto_gen on sys.path, the sibling packages are registered under those names before
the service module is imported.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

_GENERATED_PACKAGE = "gateway.proto_gen"
_HOW_TO_BUILD = (
    "the generated gRPC modules (gateway/proto_gen/) are missing: they are compiled from proto/ "
    "at build time, so run `pip install -e .` (or `pip install .`); on a machine that runs the "
    "source tree from PYTHONPATH, copy gateway/proto_gen/ from a built tree"
)

# The FileDescriptorSet (imports and comments included) that server reflection serves.
DESCRIPTOR_SET_PATH = Path(__file__).with_name("proto_gen") / "gptqgw.binpb"


def _load() -> tuple[ModuleType, ModuleType]:
    try:
        messages = importlib.import_module(f"{_GENERATED_PACKAGE}.gptqgw.v1.gateway_pb2")
    except ModuleNotFoundError as exc:
        raise ImportError(_HOW_TO_BUILD) from exc
    for name in ("gptqgw", "gptqgw.v1"):
        sys.modules.setdefault(name, importlib.import_module(f"{_GENERATED_PACKAGE}.{name}"))
    sys.modules.setdefault("gptqgw.v1.gateway_pb2", messages)
    services = importlib.import_module(f"{_GENERATED_PACKAGE}.gptqgw.v1.gateway_pb2_grpc")
    return messages, services


pb2, pb2_grpc = _load()

SERVICE_NAME: str = pb2.DESCRIPTOR.services_by_name["Gateway"].full_name

__all__ = ["DESCRIPTOR_SET_PATH", "SERVICE_NAME", "pb2", "pb2_grpc"]
