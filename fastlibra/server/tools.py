"""Tool calls in chat completions: `tools` go to the chat template, `tool_choice` decides
what the output may be, and the output is parsed back into OpenAI's `tool_calls`.

    tool_choice   output                                   parsed by
    none          free text                                nothing (tools still in the prompt)
    auto          free text, maybe the model's own calls   the model's format (`PARSERS`)
    required      JSON [{"name", "parameters"}, ...]       json.loads (enforced by a schema)
    {function}    JSON of that function's parameters       the whole output is the arguments

`required` and a named function are enforced through structured output (as vLLM does);
`auto` relies on the model writing its chat format's calls:

    hermes       (Qwen2, Hermes)  <tool_call>{"name": ..., "arguments": {...}}</tool_call>
    llama3_json  (Llama 3.1)      {"name": ..., "parameters": {...}} (";"-separated), an
                                  optional <|python_tag|> first

Streaming sends content as it comes until a call may be starting, then holds the rest
and sends each call at the end as OpenAI's deltas (id, name, then the arguments); a named
function's arguments stream as they are generated.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from fastlibra.model.sampling import StructuredOutput

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
PARSERS = ("hermes", "llama3_json")
PARSER_OF_MODEL = {"qwen2": "hermes", "llama": "llama3_json", "mistral": "hermes"}
"""The default --tool-call-parser by config.json's model_type."""


class ToolError(ValueError):
    """A bad `tools` / `tool_choice`; `field` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _function(tool: Any, i: int) -> dict:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
            or not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ToolError(f"tools[{i}]", 'a tool is {"type": "function", "function": '
                        '{"name", "description", "parameters"}}')
    params = fn.get("parameters", {"type": "object"})
    if not isinstance(params, dict):
        raise ToolError(f"tools[{i}].function.parameters", "parameters must be a JSON schema")
    return {"name": fn["name"], "parameters": params}


class ToolCalling:
    """One request's tools and tool_choice: its output constraint and its parser."""

    def __init__(self, tools: list, tool_choice: Any, parser: str) -> None:
        self.functions = {f["name"]: f for f in (_function(t, i) for i, t in enumerate(tools))}
        self.parser = parser
        if isinstance(tool_choice, dict):
            name = (tool_choice.get("function") or {}).get("name")
            if tool_choice.get("type") != "function" or not isinstance(name, str):
                raise ToolError("tool_choice", 'a named tool_choice is {"type": "function", '
                                '"function": {"name": NAME}}')
            if name not in self.functions:
                raise ToolError("tool_choice", f"tool_choice names {name!r}, which is not in "
                                f"tools ({', '.join(self.functions)})")
            self.mode, self.named = "named", name
        elif tool_choice in (None, "auto", "required"):
            self.mode, self.named = tool_choice or "auto", None
        else:
            raise ToolError("tool_choice", "tool_choice is 'none', 'auto', 'required' or "
                            f'{{"type": "function", "function": {{"name": ...}}}}; got {tool_choice!r}')

    def structured(self) -> StructuredOutput | None:
        """The output constraint that enforces `required` or a named function."""
        if self.mode == "named":
            return StructuredOutput(json=self.functions[self.named]["parameters"])
        if self.mode == "required":
            calls = [{"type": "object", "additionalProperties": False,
                      "required": ["name", "parameters"],
                      "properties": {"name": {"const": f["name"]},
                                     "parameters": f["parameters"]}}
                     for f in self.functions.values()]
            return StructuredOutput(json={"type": "array", "minItems": 1,
                                          "items": {"anyOf": calls}})
        return None

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, calls) of a finished output; calls are {"name", "arguments"} with
        arguments as JSON text. Output that is not a well-formed call stays content."""
        if self.mode == "named":
            return None, [{"name": self.named, "arguments": text}]
        if self.mode == "required":
            try:
                return None, [{"name": c["name"], "arguments": json.dumps(c["parameters"])}
                              for c in json.loads(text)]
            except (ValueError, TypeError, KeyError):  # cut short by max_tokens
                return text, []
        return (_hermes if self.parser == "hermes" else _llama3_json)(text)

    def stream(self) -> ToolStream:
        return ToolStream(self)


def _call(obj: Any, args_key: str) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return {"name": obj["name"], "arguments": json.dumps(args)}


def _hermes(text: str) -> tuple[str | None, list[dict]]:
    start = text.find(HERMES_OPEN)
    if start < 0:
        return text, []
    calls = []
    for body in re.findall(rf"{re.escape(HERMES_OPEN)}(.*?)(?:{re.escape(HERMES_CLOSE)}|$)",
                           text[start:], flags=re.DOTALL):
        try:
            call = _call(json.loads(body), "arguments")
        except ValueError:
            call = None
        if call is None:
            return text, []
        calls.append(call)
    return text[:start].strip() or None, calls


def _llama3_json(text: str) -> tuple[str | None, list[dict]]:
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if not body.startswith("{"):
        return text, []
    calls, decoder, pos = [], json.JSONDecoder(), 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except ValueError:
            return text, []
        call = _call(obj, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \n\t;":
            pos += 1
    return None, calls


class ToolStream:
    """One choice's stream: `push` each text delta (and `final` on the last), get the
    content to send now and the tool-call deltas to send now."""

    def __init__(self, tools: ToolCalling) -> None:
        self.tools = tools
        self.text = ""
        self.sent = 0
        """Characters of `text` already sent as content."""
        self.holding = False
        """A call has started: nothing more is sent until the end."""
        self.named_id: str | None = None

    def _call_start(self, rest: str) -> tuple[int | None, bool]:
        """Where in the unsent text a call starts (or may start), and whether surely."""
        if self.tools.mode == "required":
            return 0, True
        if self.tools.parser == "hermes":
            i = rest.find(HERMES_OPEN)
            if i >= 0:
                return i, True
            i = rest.rfind("<")
            return (i, False) if i >= 0 and HERMES_OPEN.startswith(rest[i:]) else (None, False)
        head = rest.lstrip()
        if self.sent or not head:  # Llama writes its calls first or not at all
            return (0, False) if not self.sent else (None, False)
        if head[0] == "{" or head.startswith(PYTHON_TAG):
            return 0, True
        return (0, False) if PYTHON_TAG.startswith(head) else (None, False)

    def push(self, delta: str, final: bool) -> tuple[str, list[dict]]:
        if self.tools.mode == "named":
            if self.named_id is None:
                self.named_id = call_id()
                return "", [{"index": 0, "id": self.named_id, "type": "function",
                             "function": {"name": self.tools.named, "arguments": delta}}]
            return "", [{"index": 0, "function": {"arguments": delta}}] if delta else []
        self.text += delta
        if final:
            return self._finish()
        if self.holding:
            return "", []
        rest = self.text[self.sent:]
        start, sure = self._call_start(rest)
        self.holding = sure
        out = rest if start is None else rest[:start]
        self.sent += len(out)
        return out, []

    def _finish(self) -> tuple[str, list[dict]]:
        content, calls = self.tools.parse(self.text)
        if not calls:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out, []
        before = self.text[:self.text.find(HERMES_OPEN)] if content else ""
        return before[self.sent:], [
            {"index": i, "id": call_id(), "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}}
            for i, c in enumerate(calls)]
