"""What a chat choice's generated text becomes: the answer (`content`), the model's thinking
(`reasoning_content`, the name vLLM and SGLang give it) and tool calls, for a whole response and as stream deltas.

The text goes through two stages, each fed in order and safe at any split of the text:
  1. reasoning (server/reasoning.py), when the model thinks (Qwen3's <think>...</think>): the thinking becomes
     `reasoning_content`, the rest goes on;
  2. tools, by the request's tool mode:
     - none: the text is the answer;
     - auto: the model's tool-call format is parsed out of it (server/tool_parsers.py); text around calls is the
       answer;
     - named: the whole output is the named tool's arguments (a grammar made it match their schema);
     - required: the whole output is a JSON list of {"name", "arguments"} (made by a grammar, too).
     The constrained modes' output is parsed once it is complete, so their streams carry the calls at the end.
A choice that made calls and stopped on its own ends with finish_reason "tool_calls".
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from minisgl_cli.server import reasoning, tool_parsers
from minisgl_cli.server.tool_parsers import ToolCall

NONE, AUTO, NAMED, REQUIRED = "none", "auto", "named", "required"


@dataclass(frozen=True)
class ChatOutputRules:
    """How one request's choices are read: its tool mode (and the named tool) and the server's parsers."""

    tool_mode: str = NONE
    tool_name: str | None = None  # the named tool
    tool_parser: str | None = None  # a tool_parsers.PARSERS name, for auto
    reasoning_parser: str | None = None  # a reasoning.PARSERS name


@dataclass
class Message:
    content: str | None
    reasoning_content: str | None
    tool_calls: list[ToolCall]


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ChatOutput:
    """One choice's text as it arrives: `feed` each piece, then `finish`; each returns the stream's deltas."""

    rules: ChatOutputRules
    _content: list[str] = field(default_factory=list)
    _reasoning_text: list[str] = field(default_factory=list)
    _calls: list[ToolCall] = field(default_factory=list)
    _held: list[str] = field(default_factory=list)  # a constrained mode's output, parsed when complete

    def __post_init__(self) -> None:
        name = self.rules.reasoning_parser
        self._thinking = reasoning.PARSERS[name]() if name else None
        auto = self.rules.tool_mode == AUTO and self.rules.tool_parser
        self._parser = tool_parsers.PARSERS[self.rules.tool_parser]() if auto else None  # type: ignore[index]

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._thinking is None:
            return self._answer(text)
        split = self._thinking.feed(text)
        return self._think(split.reasoning) + self._answer(split.content)

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The last deltas, and the finish reason to report ("tool_calls" when calls were made)."""
        deltas: list[dict[str, Any]] = []
        if self._thinking is not None:
            split = self._thinking.finish()
            deltas += self._think(split.reasoning) + self._answer(split.content)
        if self._parser is not None:
            deltas += self._take(self._parser.finish())
        elif self.rules.tool_mode in (NAMED, REQUIRED):
            deltas += self._constrained_calls(finish_reason)
        if self._calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return deltas, finish_reason

    def message(self) -> Message:
        content = "".join(self._content)
        thought = "".join(self._reasoning_text)
        return Message(
            # Only whitespace between calls (the newline between two <tool_call> blocks) is no answer.
            content=content if content.strip() or not self._calls else None,
            reasoning_content=thought or None,
            tool_calls=list(self._calls),
        )

    # ---- the stages

    def _think(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        self._reasoning_text.append(text)
        return [{"reasoning_content": text}]

    def _answer(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        if self._parser is not None:
            return self._take(self._parser.feed(text))
        if self.rules.tool_mode in (NAMED, REQUIRED):
            self._held.append(text)
            return []
        self._content.append(text)
        return [{"content": text}]

    def _take(self, parsed: tool_parsers.ParsedDelta) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        if parsed.content:
            self._content.append(parsed.content)
            deltas.append({"content": parsed.content})
        for call in parsed.tool_calls:
            deltas += self._call_deltas(call)
        return deltas

    def _call_deltas(self, call: ToolCall) -> list[dict[str, Any]]:
        """OpenAI's stream shape: the call's id and name first, then its arguments."""
        index = len(self._calls)
        self._calls.append(call)
        head = {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        return [
            {"tool_calls": [head]},
            {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]},
        ]

    def _constrained_calls(self, finish_reason: str | None) -> list[dict[str, Any]]:
        text = "".join(self._held)
        calls = _read_constrained(text, self.rules) if finish_reason == "stop" else None
        if calls is None:  # cut short (max_tokens): the partial output is all there is to show
            self._content.append(text)
            return [{"content": text}] if text else []
        deltas: list[dict[str, Any]] = []
        for call in calls:
            deltas += self._call_deltas(call)
        return deltas


def _read_constrained(text: str, rules: ChatOutputRules) -> list[ToolCall] | None:
    """The calls in a named or required mode's complete output, or None if it does not parse."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if rules.tool_mode == NAMED:
        assert rules.tool_name is not None
        return [ToolCall(rules.tool_name, json.dumps(value, ensure_ascii=False), _call_id())]
    if not isinstance(value, list):
        return None
    calls = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = json.dumps(item.get("arguments", {}), ensure_ascii=False)
        calls.append(ToolCall(item["name"], arguments, _call_id()))
    return calls


def required_schema(tools: list[tuple[str, dict[str, Any]]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of tool_choice "required"'s output: a list of one call (or more, when parallel calls
    are allowed), each naming one of `tools` (name, arguments schema) and giving arguments that match it."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": schema},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, schema in tools
    ]
    array: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
    }
    if not parallel:
        array["maxItems"] = 1
    return array
