"""Tool calls read from a model turn's text in the Qwen (Hermes) format:

    <tool_call>
    {"name": "zoom", "arguments": {"region": "top left"}}
    </tool_call>

A call that cannot be read (no closing tag, not JSON, no name, arguments not an object) is a `MalformedCall` whose
`error` the environment returns to the model as the observation: never an exception.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)(" + re.escape(CLOSE) + r"|$)", re.DOTALL)
CALL_FORMAT = '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


@dataclass(frozen=True)
class MalformedCall:
    text: str  # what stood between the tags
    error: str  # what is wrong, said to the model


def parse_tool_calls(text: str) -> list[ToolCall | MalformedCall]:
    """Every `<tool_call>...</tool_call>` of `text`, in order; an empty list when the turn calls no tool."""
    calls: list[ToolCall | MalformedCall] = []
    for match in _CALL.finditer(text):
        body, closed = match.group(1).strip(), bool(match.group(2))
        if not closed:
            calls.append(MalformedCall(body, f"the tool call is not closed with {CLOSE}; write {CALL_FORMAT}"))
            continue
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(MalformedCall(body, f"the tool call is not valid JSON ({e.msg} at character {e.pos}); write {CALL_FORMAT}"))
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append(MalformedCall(body, f'the tool call has no "name"; write {CALL_FORMAT}'))
            continue
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            calls.append(MalformedCall(body, f'the tool call\'s "arguments" is not a JSON object; write {CALL_FORMAT}'))
            continue
        calls.append(ToolCall(call["name"], arguments))
    return calls
