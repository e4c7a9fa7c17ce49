"""`response_format` (OpenAI structured outputs) on /v1/chat/completions and /v1/completions.

`{"type": "text"}` is plain output; `{"type": "json_object"}` constrains it to a JSON object and
`{"type": "json_schema", "json_schema": {"name", "description"?, "schema"?, "strict"?}}` to JSON
matching the schema. Without a schema it is any JSON object, as json_object: OpenAI's structured
outputs always have an object at the root, and an unconstrained value lets a small model write
digits forever. Either becomes the upstream `sampling.guided`; the engine compiles it, and a
schema its grammar library cannot honour comes back as INVALID_ARGUMENT on `sampling.guided`,
which the shim reports as a 400 naming `response_format`. Constrained decoding always holds, so
`strict: false` constrains too.

The shape is checked here before pydantic's own validation, so that every malformed value is a
400 whose `param` is `response_format` and whose message says what is wrong.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# OpenAI's rule for the schema's name.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_SCHEMA_CHARS = 1 << 20  # larger schemas are refused before anything compiles them
PARAM = "response_format"
_TYPES = ("text", "json_object", "json_schema")
_JSON_SCHEMA_KEYS = ("name", "description", "schema", "strict")


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object"]


class JSONSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="A JSON Schema; none: any JSON object."
    )
    strict: bool | None = Field(default=None, description="Accepted: the output always matches.")


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


def _checked(value: Any) -> Any:
    problem = shape_problem(value)
    if problem is not None:
        from gateway.openai_api.schemas import FieldError

        raise FieldError(PARAM, problem)
    return value


ResponseFormat = Annotated[
    TextFormat | JSONObjectFormat | JSONSchemaFormat | None,
    BeforeValidator(_checked),
    Field(
        default=None,
        discriminator="type",
        description="{'type': 'text'} (default), {'type': 'json_object'}, or {'type': "
        "'json_schema', 'json_schema': {'name', 'schema', 'strict'}}: the output is constrained "
        "to JSON (matching the schema). Schemas the grammar library cannot honour are a 400.",
    ),
]


def shape_problem(value: Any) -> str | None:
    """What is wrong with a raw response_format value (None: nothing)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return "must be an object with a 'type'"
    kind = value.get("type")
    if kind not in _TYPES:
        return f"type must be one of {', '.join(map(repr, _TYPES))}, got {kind!r}"
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    extra = sorted(set(value) - allowed)
    if extra:
        return f"unknown field(s) for type {kind!r}: {', '.join(extra)}"
    if kind != "json_schema":
        return None
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        return "json_schema must be an object with a 'name' (and a 'schema')"
    unknown = sorted(set(spec) - set(_JSON_SCHEMA_KEYS))
    if unknown:
        return f"json_schema has unknown field(s): {', '.join(unknown)}"
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        return "json_schema.name is required: 1 to 64 letters, digits, '_' or '-'"
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        return "json_schema.description must be a string"
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        return "json_schema.strict must be a boolean"
    return _schema_problem(spec.get("schema"))


def _schema_problem(schema: Any) -> str | None:
    if schema is None:
        return None
    if not isinstance(schema, dict):
        return "json_schema.schema must be a JSON Schema object"
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        return f"json_schema.schema is longer than {MAX_SCHEMA_CHARS} characters"
    try:
        import jsonschema_rs
    except ImportError:  # pragma: no cover - then only the grammar library judges it
        return None
    try:
        jsonschema_rs.meta.validate(schema)
    except Exception as exc:  # ValidationError, or ValueError for a bad $schema
        return f"json_schema.schema is not a valid JSON Schema: {str(exc).splitlines()[0]}"
    return None


def guided(value: TextFormat | JSONObjectFormat | JSONSchemaFormat | None) -> dict[str, Any] | None:
    """The upstream `sampling.guided` for a validated response_format (None: unconstrained)."""
    if value is None or isinstance(value, TextFormat):
        return None
    schema = value.json_schema.schema_ if isinstance(value, JSONSchemaFormat) else None
    if schema is None:
        return {"json_object": True}
    return {"json_schema": json.dumps(schema)}


def is_constrained(value: Any) -> bool:
    return guided(value) is not None
