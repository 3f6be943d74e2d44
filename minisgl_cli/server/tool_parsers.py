"""Tool-call parsers: find the calls a model wrote in its output, whole or as it streams.

Each model family writes tool calls its own way: hermes wraps JSON in `<tool_call>` tags (Qwen, Hermes),
Llama 3 writes bare JSON objects, Mistral writes `[TOOL_CALLS]` and a JSON list. A parser is fed one
choice's generated text in pieces, in order, and answers with the plain text that is safe to show now and
the calls that just completed. It holds back any tail that could still become a tag, so a stream never
shows half a tag, and whatever it cannot parse comes back as content rather than being lost.

Every decision is made on characters already seen, never on where a piece ended, so a text fed whole, in
two pieces or one character at a time gives the same content and the same calls.
"""

from __future__ import annotations

import json
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


def _new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # the arguments object as JSON text
    id: str = field(default_factory=_new_call_id)


@dataclass
class ParsedDelta:
    content: str = ""  # plain text to show now (may be "")
    tool_calls: list[ToolCall] = field(default_factory=list)  # calls completed by this piece of text


class ToolParser(ABC):
    """Splits one choice's output into content and tool calls; fed in order, then finished once."""

    def __init__(self) -> None:
        self._buf = ""  # text fed but not yet decided on
        self._out = ParsedDelta()

    def feed(self, text: str) -> ParsedDelta:
        """The next piece of generated text; returns what it decided (content may lag behind it)."""
        self._buf += text
        self._advance(final=False)
        return self._take()

    def finish(self) -> ParsedDelta:
        """The end of the output: everything still held back is decided now."""
        self._advance(final=True)
        return self._take()

    @abstractmethod
    def _advance(self, final: bool) -> None:
        """Consume as much of `_buf` as can be decided; with `final`, all of it."""

    def _emit_text(self, text: str) -> None:
        self._out.content += text

    def _emit_call(self, call: ToolCall) -> None:
        self._out.tool_calls.append(call)

    def _take(self) -> ParsedDelta:
        out, self._out = self._out, ParsedDelta()
        return out


def parse_all(parser: ToolParser, text: str) -> ParsedDelta:
    """A whole output at once: feed(text), then finish(), merged."""
    first, last = parser.feed(text), parser.finish()
    return ParsedDelta(first.content + last.content, first.tool_calls + last.tool_calls)


class _JsonScan:
    """Follows a JSON text character by character, enough to tell where its outer value ends.

    It tracks strings (and their escapes) so that brackets or tags inside a string don't count.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self._escaped = False

    def push(self, c: str) -> bool:
        """Takes the next character; True when it closes the outermost bracket."""
        if self.in_string:
            if self._escaped:
                self._escaped = False
            elif c == "\\":
                self._escaped = True
            elif c == '"':
                self.in_string = False
            return False
        if c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


def _tag_prefix_len(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag` (a proper prefix)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None


def _to_call(obj: object, arg_keys: tuple[str, ...], args_required: bool = False) -> ToolCall | None:
    """The call a parsed JSON object describes, or None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in arg_keys if k in obj), None)
    if args is None:
        if args_required:
            return None
        args = {}
    if isinstance(args, str):  # some models write the arguments object as a JSON string
        args = _loads(args)
    if not isinstance(args, dict):
        return None
    return ToolCall(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False))


class _TaggedParser(ToolParser):
    """Text with calls introduced by an opening tag: plain text outside, held back while it ends in a
    possible tag start. Subclasses say how a call's text ends once its tag has been seen."""

    open_tag = ""

    def __init__(self) -> None:
        super().__init__()
        self._call: str | None = None  # the current call's raw text after its opening tag; None in text

    def _advance(self, final: bool) -> None:
        while True:
            if self._call is None:
                i = self._buf.find(self.open_tag)
                if i < 0:
                    cut = len(self._buf) - (0 if final else _tag_prefix_len(self._buf, self.open_tag))
                    self._emit_text(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    return
                self._emit_text(self._buf[:i])
                self._buf = self._buf[i + len(self.open_tag) :]
                self._call = ""
                self._start_call()
            elif not self._advance_call(final):
                return

    @abstractmethod
    def _start_call(self) -> None: ...

    @abstractmethod
    def _advance_call(self, final: bool) -> bool:
        """Move text from `_buf` into the call; True when the call was decided (and `_call` reset)."""


class HermesParser(_TaggedParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks amid plain text."""

    open_tag = "<tool_call>"
    close_tag = "</tool_call>"

    def _start_call(self) -> None:
        self._scan = _JsonScan()

    def _advance_call(self, final: bool) -> bool:
        assert self._call is not None
        buf, close, scan = self._buf, self.close_tag, self._scan
        for i, c in enumerate(buf):
            # The block ends at the first closing tag outside a JSON string: a string may quote the tag,
            # and malformed JSON (an unbalanced brace) must not run the block into the next one.
            if c == "<" and not scan.in_string:
                if buf.startswith(close, i):
                    self._end_call(self._call + buf[:i], closed=True)
                    self._buf = buf[i + len(close) :]
                    return True
                if not final and close.startswith(buf[i:]):  # maybe the tag, cut by the piece's end
                    self._call += buf[:i]
                    self._buf = buf[i:]
                    return False
            scan.push(c)
        self._call += buf
        self._buf = ""
        if final:  # output ended inside the block
            self._end_call(self._call, closed=False)
        return final

    def _end_call(self, body: str, closed: bool) -> None:
        # A complete call cut before (or inside) its closing tag, e.g. by max_tokens, still counts.
        json_text = body if closed else body[: len(body) - _tag_prefix_len(body, self.close_tag)]
        call = _to_call(_loads(json_text), ("arguments", "parameters"))
        if call is not None:
            self._emit_call(call)
        else:
            self._emit_text(self.open_tag + body + (self.close_tag if closed else ""))
        self._call = None


class MistralParser(_TaggedParser):
    """`[TOOL_CALLS]` then a JSON list of `{"name": ..., "arguments": {...}}` (or one such object)."""

    open_tag = "[TOOL_CALLS]"

    def _start_call(self) -> None:
        self._scan: _JsonScan | None = None  # None until the JSON value's first bracket

    def _advance_call(self, final: bool) -> bool:
        assert self._call is not None
        buf = self._buf
        if self._scan is None:
            lead = len(buf) - len(buf.lstrip())
            self._call += buf[:lead]
            buf = self._buf = buf[lead:]
            if not buf:
                if final:
                    self._give_up(self._call)
                return final
            if buf[0] not in "[{":  # the tag with no JSON after it: leave it as text
                self._give_up(self._call)
                return True
            self._scan = _JsonScan()
        for i, c in enumerate(buf):
            if self._scan.push(c):
                self._end_call(self._call + buf[: i + 1])
                self._buf = buf[i + 1 :]
                return True
        self._call += buf
        self._buf = ""
        if final:
            self._give_up(self._call)
        return final

    def _end_call(self, value_text: str) -> None:
        value = _loads(value_text)
        items = value if isinstance(value, list) else [value]
        calls = [_to_call(item, ("arguments", "parameters")) for item in items]
        if items and all(calls):
            for call in calls:
                assert call is not None
                self._emit_call(call)
            self._call = None
        else:  # one bad entry makes the whole list text: a partial list of calls would mislead
            self._give_up(value_text)

    def _give_up(self, raw: str) -> None:
        self._emit_text(self.open_tag + raw)
        self._call = None


class Llama3JsonParser(ToolParser):
    """The whole output is JSON calls `{"name": ..., "parameters": {...}}`, optionally after
    `<|python_tag|>`, separated by `;` or whitespace; an output that does not start with `{` is text."""

    python_tag = "<|python_tag|>"
    separators = " \t\r\n;"

    def __init__(self) -> None:
        super().__init__()
        self._held = ""  # separators (and python tags) seen since the last call, not yet decided
        self._obj: str | None = None  # raw text of the object being read
        self._scan = _JsonScan()
        self._is_text = False  # once the output turned out to be text, everything after is text
        self._seen_call = False

    def _advance(self, final: bool) -> None:
        while self._buf:
            if self._is_text:
                self._emit_text(self._buf)
                self._buf = ""
            elif self._obj is None:
                if not self._advance_separators(final):
                    break
            else:
                self._advance_object()
        if final:
            if self._obj is not None:  # output ended inside an object
                self._to_text(self._obj)
            elif not self._seen_call:  # only whitespace or tags: that was the whole (text) output
                self._emit_text(self._held)
            self._held = ""

    def _advance_separators(self, final: bool) -> bool:
        """Skip separators; False when waiting for more text to decide."""
        buf, tag = self._buf, self.python_tag
        i = 0
        while i < len(buf):
            if buf[i] in self.separators:
                i += 1
            elif buf.startswith(tag, i):
                i += len(tag)
            else:
                break
        self._held += buf[:i]
        self._buf = buf = buf[i:]
        if not buf or (not final and tag.startswith(buf)):
            return False
        if buf[0] == "{":
            self._obj = ""
            self._scan = _JsonScan()
        else:
            self._to_text("")
        return True

    def _advance_object(self) -> None:
        assert self._obj is not None
        buf = self._buf
        for i, c in enumerate(buf):
            if self._scan.push(c):
                text = self._obj + buf[: i + 1]
                self._buf = buf[i + 1 :]
                self._obj = None
                call = _to_call(_loads(text), ("parameters", "arguments"), args_required=True)
                if call is None:
                    self._to_text(text)
                else:
                    self._emit_call(call)
                    self._seen_call = True
                    self._held = ""
                return
        self._obj += buf
        self._buf = ""

    def _to_text(self, raw: str) -> None:
        # Before any call the output is plain text, kept whole; separators after a call are dropped.
        self._emit_text(("" if self._seen_call else self._held) + raw)
        self._held = ""
        self._obj = None
        self._is_text = True


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
}


def detect_parser(chat_template: str | None) -> str | None:
    """The parser a model's chat template implies (by the marks it teaches the model), or None."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_tag|>" in chat_template or ("ipython" in chat_template and '"parameters"' in chat_template):
        return "llama3_json"
    return None
