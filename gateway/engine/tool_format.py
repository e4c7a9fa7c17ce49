"""Which tool-call format a chat template teaches its model, read from the template's text.

Only the server sees the checkpoint's template, so the format is decided here and reported on
the model card (gptqgw.v1 Model.tool_call_format); the REST shim parses outputs by it. The
markers are the ones each family's template writes into the prompt:

- "mistral": `[TOOL_CALLS]` / `[AVAILABLE_TOOLS]` (Mistral, Mixtral, Ministral);
- "hermes": `<tool_call>` (Qwen2.5, Qwen3, Hermes 2/3 and other NousResearch-style templates);
- "llama3_json": `<|python_tag|>`, the `ipython` role, or a JSON object with "parameters"
  (Llama 3.1, 3.2, 3.3);
- "": the template never renders `tools`, or writes calls in a way none of the parsers reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

TOOL_CALL_FORMATS = ("hermes", "llama3_json", "mistral")
NO_TOOL_SUPPORT = ""

# A template that renders tools names the variable: `{% if tools %}`, `tools | tojson`, ...
_USES_TOOLS = re.compile(r"[{%][^}%]*\btools\b")
_LLAMA3_MARKERS = ("<|python_tag|>", "ipython", '"parameters"')


def template_text(chat_template: Any) -> str:
    """The template source; a tokenizer may hold several named templates (a dict or a list of
    {"name", "template"}), whose texts are joined."""
    if isinstance(chat_template, str):
        return chat_template
    if isinstance(chat_template, Mapping):
        return "\n".join(str(text) for text in chat_template.values())
    if isinstance(chat_template, (list, tuple)):
        return "\n".join(
            str(item.get("template", "")) if isinstance(item, Mapping) else str(item)
            for item in chat_template
        )
    return ""


def detect_tool_call_format(chat_template: Any) -> str:
    """One of TOOL_CALL_FORMATS, or NO_TOOL_SUPPORT."""
    text = template_text(chat_template)
    if not text or not _USES_TOOLS.search(text):
        return NO_TOOL_SUPPORT
    # Mistral first: its templates may also mention JSON "parameters" (in the tool schemas).
    if "[TOOL_CALLS]" in text or "[AVAILABLE_TOOLS]" in text:
        return "mistral"
    if "<tool_call>" in text:
        return "hermes"
    if any(marker in text for marker in _LLAMA3_MARKERS):
        return "llama3_json"
    return NO_TOOL_SUPPORT
