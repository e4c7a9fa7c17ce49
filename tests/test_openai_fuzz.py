"""Fuzzing the shim through its own OpenAPI schema (schemathesis): valid and invalid requests to
every operation, against a real shim and a real gRPC server with SmolLM2 behind it. Whatever
comes in, the answer must be no 5xx, within a timeout (no hang), with a status and a body that the
schema documents; the shim must still answer afterwards (no crash).

Generated requests ask for at most a few tokens (and at most two choices or prompts), so that
the examples go into the request shapes rather than into decoding on a 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fixtures_grpc import API_KEY, start_gateway
from fixtures_openai import ServedShim, start_shim
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow

MODEL = "fuzz-model"
MAX_NEW_TOKENS = 3
REQUEST_TIMEOUT_S = 120  # a hang fails the test instead of blocking it
MAX_EXAMPLES = 40  # per POST operation, valid requests


@pytest.fixture(scope="module")
def fuzz_shim(
    smollm2_w4_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedShim]:
    work_dir = tmp_path_factory.mktemp("openai-fuzz")
    gateway = start_gateway(
        smollm2_w4_checkpoint,
        work_dir,
        extra_args=["--max-model-len", "128", "--model-name", MODEL, "--max-num-seqs", "4"],
    )
    shim = start_shim(gateway.grpc_target, work_dir, api_keys=(), upstream_key=API_KEY)
    try:
        yield shim
        # No crash: the shim is still up and serving after everything it was sent.
        assert shim.request("GET", "/ready")[0] == 200, shim.log_tail()
    finally:
        assert shim.stop() == 0, shim.log_tail()
        gateway.stop()


def _operation_labels() -> list[str]:
    """The operations the shim's schema describes (built in-process; no server needed)."""
    from gateway.openai_api import ShimConfig, create_app

    document = create_app(ShimConfig(upstream="127.0.0.1:1")).openapi()
    return [
        f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item
    ]


@pytest.fixture(scope="module")
def served_operations(fuzz_shim: ServedShim) -> dict[str, Any]:
    """The schema the running shim serves, by operation label."""
    schema = schemathesis.openapi.from_url(f"{fuzz_shim.base_url}/openapi.json")
    operations = {op.label: op for op in (result.ok() for result in schema.get_all_operations())}
    assert set(operations) == set(_operation_labels())
    return operations


def keep_generation_small(body: Any) -> None:
    """Bound what a generated request costs, keeping its shape (and its mistakes)."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = MODEL  # otherwise nearly every request stops at a 404
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_NEW_TOKENS:
            body[name] = MAX_NEW_TOKENS
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_NEW_TOKENS
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 2:
        body["n"] = 2
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        del prompt[2:]


def _cases() -> list[tuple[str, GenerationMode]]:
    """Valid requests for every operation; invalid ones where there is something to get wrong
    (a body or a path parameter)."""
    labels = _operation_labels()
    return [(label, GenerationMode.POSITIVE) for label in labels] + [
        (label, GenerationMode.NEGATIVE)
        for label in labels
        if label.startswith("POST") or "{" in label
    ]


# schemathesis' own pytest plugin does not run under pytest 9, so its strategies are driven by
# hypothesis directly: one test per operation and generation mode.
@pytest.mark.parametrize(("label", "mode"), _cases(), ids=lambda value: str(value))
def test_no_server_errors_and_documented_answers(
    fuzz_shim: ServedShim, served_operations: dict[str, Any], label: str, mode: GenerationMode
) -> None:
    operation = served_operations[label]
    if not label.startswith("POST"):
        examples = 10
    else:  # most negative examples stop at validation; positive ones run the model
        examples = MAX_EXAMPLES if mode == GenerationMode.POSITIVE else 2 * MAX_EXAMPLES

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def exchange(case: Any) -> None:
        keep_generation_small(case.body)
        response = case.call(base_url=fuzz_shim.base_url, timeout=REQUEST_TIMEOUT_S)
        case.validate_response(
            response,
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
            ],
        )

    exchange()
