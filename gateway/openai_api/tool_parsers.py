"""Tool calls out of a model's text, as it streams: content to show, and calls to hand back.

One incremental parser per choice. `feed(text)` returns what can be said now; `finish()` what
is left at the end. A non-streamed answer is the same parser fed the whole text, so the streamed
and the whole response always agree.

Plain text is never held back longer than needed: only a tail that could be the start of a call
marker (`<tool_call>` arriving as `<tool` + `_call>`), and whitespace, which becomes content
only when more content follows (the newline a model writes before its calls is not content).
A call that does not parse (bad JSON, an undeclared function, a cut-off output) is given back
as the text it was, as content: never an error.

Formats (the server names the model's from its chat template, gateway/engine/tool_format.py):

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, text between;
- llama3_json: the whole output is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`), several separated by `;`;
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` after optional text, or
  `[TOOL_CALLS]name[ARGS]{...}` (newer templates). `[TOOL_CALLS]` is a control token that the
  server's detokenizer drops, so an output that *starts* with a JSON list of calls counts too;
- required / named (not a template format): the output was constrained by a JSON schema
  (tool_choice.py, guided decoding) to a list of `{"name", "arguments"}` objects, or to one
  function's arguments object; the whole output is that JSON (a list cut off by max_tokens
  keeps its complete calls).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass

PYTHON_TAG = "<|python_tag|>"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARKER, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
# Guided outputs: not template formats, so never reported by the server.
REQUIRED, NAMED = "required", "named"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = ""

    def as_openai(self) -> dict[str, object]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class Content:
    text: str


Piece = Content | ToolCall  # what a parser emits, in output order


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def mistral_call_id() -> str:
    """Mistral's templates refuse a call id in the history that is not 9 letters or digits."""
    return uuid.uuid4().hex[:9]


# ----------------------------------------------------------------------------- bodies


BodyParser = Callable[[str], list[tuple[str, object]] | None]


def _arguments(value: object) -> object | None:
    """A call's arguments as an object: given as one, or as JSON text of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def _call(obj: object, argument_keys: tuple[str, ...]) -> tuple[str, object] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((k for k in argument_keys if k in obj), None)
    arguments = _arguments(obj[key]) if key is not None else {}
    return None if arguments is None else (obj["name"], arguments)


def _loads(text: str) -> object | None:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _call_list(value: object) -> list[tuple[str, object]] | None:
    if not isinstance(value, list) or not value:
        return None
    calls = [_call(item, ("arguments", "parameters")) for item in value]
    return None if any(call is None for call in calls) else calls  # type: ignore[return-value]


def parse_hermes_body(body: str) -> list[tuple[str, object]] | None:
    call = _call(_loads(body.strip()), ("arguments", "parameters"))
    return None if call is None else [call]


def parse_llama3_body(body: str) -> list[tuple[str, object]] | None:
    """One or more JSON objects, separated by `;` (and whitespace)."""
    text = body.strip()
    if text.startswith(PYTHON_TAG):
        text = text[len(PYTHON_TAG) :].lstrip()
    decoder = json.JSONDecoder()
    calls: list[tuple[str, object]] = []
    position = 0
    while position < len(text):
        try:
            obj, end = decoder.raw_decode(text, position)
        except (ValueError, RecursionError):
            return None
        call = _call(obj, ("parameters", "arguments"))
        if call is None:
            return None
        calls.append(call)
        rest = text[end:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        elif rest:
            return None
        position = len(text) - len(rest)
    return calls or None


def parse_mistral_body(body: str) -> list[tuple[str, object]] | None:
    """After `[TOOL_CALLS]`: a JSON list of calls, or `name[ARGS]{...}` repeated."""
    text = body.strip()
    if text.startswith(MISTRAL_MARKER):  # a section opened by the start "[" of the marker
        text = text[len(MISTRAL_MARKER) :].lstrip()
    if text.startswith("["):
        return _call_list(_loads(text))
    calls: list[tuple[str, object]] = []
    for part in text.split(MISTRAL_MARKER):
        name, marker, arguments = part.partition(MISTRAL_ARGS)
        name = name.strip()
        value = _arguments(arguments.strip()) if marker else None
        if not name or value is None:
            return None
        calls.append((name, value))
    return calls or None


def parse_required_body(body: str) -> list[tuple[str, object]] | None:
    """The guided list of calls. Cut off by max_tokens, the list still holds its complete
    calls (guided decoding guarantees that the rest is the start of another): those count."""
    text = body.strip()
    calls = _call_list(_loads(text))
    if calls is not None or not text.startswith("["):
        return calls
    decoder = json.JSONDecoder()
    complete: list[object] = []
    position = 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        try:
            item, position = decoder.raw_decode(text, position)
        except (ValueError, RecursionError):
            break
        complete.append(item)
    return _call_list(complete)


# ----------------------------------------------------------------------------- streaming


@dataclass(frozen=True)
class _Format:
    opens: tuple[str, ...]  # markers that start a call section anywhere (not part of its body)
    close: str | None  # what ends a section; None: it runs to the end of the output
    body: BodyParser
    # Markers that start a section only at the start of the output (after whitespace), and are
    # part of its body: "{" of a Llama JSON call, "[" of a Mistral call list, "" (any text) of
    # a guided output.
    start_opens: tuple[str, ...] = ()


_FORMATS: dict[str, _Format] = {
    "hermes": _Format((HERMES_OPEN,), HERMES_CLOSE, parse_hermes_body),
    "llama3_json": _Format((), None, parse_llama3_body, start_opens=(PYTHON_TAG, "{")),
    "mistral": _Format((MISTRAL_MARKER,), None, parse_mistral_body, start_opens=("[",)),
    REQUIRED: _Format((), None, parse_required_body, start_opens=("",)),
}


def _named_format(name: str) -> _Format:
    def body(text: str) -> list[tuple[str, object]] | None:
        arguments = _arguments(_loads(text.strip()))
        return None if arguments is None else [(name, arguments)]

    return _Format((), None, body, start_opens=("",))


def _partial_marker(text: str, markers: Collection[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a marker."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


class ToolCallParser:
    """Incremental parser of one choice's output. `fmt` is a server-reported format, REQUIRED,
    or NAMED with `function` naming the function whose arguments the output is. `names`: the
    declared functions; a call to any other is not a call (None: any name)."""

    def __init__(
        self, fmt: str, names: Collection[str] | None = None, function: str | None = None
    ) -> None:
        if fmt == NAMED:
            if not function:
                raise ValueError("a named tool choice needs the function's name")
            self._format = _named_format(function)
        elif fmt in _FORMATS:
            self._format = _FORMATS[fmt]
        else:
            raise ValueError(f"unknown tool-call format {fmt!r}")
        self._names = None if names is None else frozenset(names)
        self._new_id = mistral_call_id if fmt == "mistral" else new_call_id
        self._pending = ""  # text not yet classified (a partial marker, or leading whitespace)
        self._section: str | None = None  # inside a call section: its text so far
        self._opened_with = ""  # the marker that opened it (given back if it is no call)
        self._blank = ""  # whitespace held until more content follows
        self._at_start = bool(self._format.start_opens)  # start markers still possible
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        self._pending += text
        self._advance(out, final=False)
        return out

    def finish(self) -> list[Piece]:
        out: list[Piece] = []
        self._advance(out, final=True)
        if self._section is not None:
            self._end_section(self._section, out, closed=False)
        if self._pending:
            self._content(self._pending, out)
            self._pending = ""
        if self._blank and not self.calls:  # trailing whitespace of a plain answer is content
            out.append(Content(self._blank))
        self._blank = ""
        return out

    # ------------------------------------------------------------------ internals

    def _advance(self, out: list[Piece], final: bool) -> None:
        fmt = self._format
        while self._pending:
            if self._section is not None:
                if fmt.close is None:
                    self._section += self._pending
                    self._pending = ""
                    return
                text = self._section + self._pending
                # Only where the new text could complete the close marker (no quadratic scan).
                end = text.find(fmt.close, max(0, len(self._section) - len(fmt.close) + 1))
                if end < 0:
                    self._section, self._pending = text, ""
                    return
                self._pending = text[end + len(fmt.close) :]
                self._end_section(text[:end], out, closed=True)
                continue
            if self._at_start:
                if not self._open_at_start(final):
                    return
                continue
            starts = [(self._pending.find(m), m) for m in fmt.opens]
            found = [(i, m) for i, m in starts if i >= 0]
            if found:
                index, marker = min(found)
                self._content(self._pending[:index], out)
                self._opened_with, self._section = marker, ""
                self._pending = self._pending[index + len(marker) :]
                continue
            keep = 0 if final else _partial_marker(self._pending, fmt.opens)
            self._content(self._pending[: len(self._pending) - keep], out)
            self._pending = self._pending[len(self._pending) - keep :]
            return

    def _open_at_start(self, final: bool) -> bool:
        """Open a section if the output begins with a start marker, or rule that out for good.
        False: wait for more text."""
        stripped = self._pending.lstrip()
        if not stripped and not final:
            return False  # only whitespace so far
        markers = self._format.start_opens
        if stripped and any(stripped.startswith(m) for m in markers):
            # The marker is part of the body; the whitespace before it is given back if the
            # section turns out to be no call.
            self._opened_with = self._pending[: len(self._pending) - len(stripped)]
            self._section = stripped
            self._pending = ""
            self._at_start = False
            return True
        if not final and any(m.startswith(stripped) for m in markers):
            return False  # a marker may still be arriving
        self._at_start = False
        return True

    def _end_section(self, body: str, out: list[Piece], closed: bool) -> None:
        self._section = None
        calls = self._format.body(body)
        names = self._names
        if calls is not None and names is not None and any(n not in names for n, _ in calls):
            calls = None
        if calls is None:  # not a call after all: the text it was
            raw = self._opened_with + body
            if closed and self._format.close:
                raw += self._format.close
            self._content(raw, out)
            return
        self._blank = ""  # whitespace between calls and around them is not content
        for name, arguments in calls:
            out.append(ToolCall(name, json.dumps(arguments, ensure_ascii=False), self._new_id()))
            self.calls += 1

    def _content(self, text: str, out: list[Piece]) -> None:
        """Content, less trailing whitespace, which waits for what follows it: more content
        (then it is content) or a call (then it is dropped)."""
        core = text.rstrip()
        if not core:
            self._blank += text
            return
        out.append(Content(self._blank + core))
        self._blank = text[len(core) :]


def parse_tool_calls(
    text: str,
    fmt: str,
    names: Collection[str] | None = None,
    function: str | None = None,
) -> tuple[str | None, list[ToolCall]]:
    """A whole output's content (None when there is none) and calls."""
    parser = ToolCallParser(fmt, names, function)
    pieces = parser.feed(text) + parser.finish()
    content = "".join(piece.text for piece in pieces if isinstance(piece, Content))
    calls = [piece for piece in pieces if isinstance(piece, ToolCall)]
    if calls and not content.strip():
        return None, calls
    return (content or None) if calls else content, calls
