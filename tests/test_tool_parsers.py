"""Tool-call parsers: each format's outputs parse to the expected content and calls, and streaming them
split anywhere (every two-piece split, one character at a time) gives exactly what parsing them whole does."""

from __future__ import annotations

import json
import random
import re

import pytest

from minisgl_cli.server.tool_parsers import PARSERS, ParsedDelta, ToolParser, detect_parser, parse_all

Calls = list[tuple[str, dict]]


def _calls(delta: ParsedDelta) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in delta.tool_calls]


def _stream(parser: ToolParser, pieces: list[str]) -> ParsedDelta:
    out = ParsedDelta()
    for piece in pieces:
        d = parser.feed(piece)
        out.content += d.content
        out.tool_calls += d.tool_calls
    d = parser.finish()
    return ParsedDelta(out.content + d.content, out.tool_calls + d.tool_calls)


def check(fmt: str, text: str, content: str, calls: Calls) -> None:
    """`text` parses to `content` and `calls` whole, split in two anywhere, and char by char."""
    whole = parse_all(PARSERS[fmt](), text)
    assert whole.content == content
    assert [(n, json.loads(a)) for n, a in _calls(whole)] == calls
    for c in whole.tool_calls:
        assert c.arguments == json.dumps(json.loads(c.arguments), ensure_ascii=False)  # re-serialized
    expected = (whole.content, _calls(whole))
    for k in range(len(text) + 1):
        got = _stream(PARSERS[fmt](), [text[:k], text[k:]])
        assert (got.content, _calls(got)) == expected, f"split at {k}: {text[:k]!r} | {text[k:]!r}"
    got = _stream(PARSERS[fmt](), list(text))
    assert (got.content, _calls(got)) == expected, "one char at a time"


WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
NESTED_ARGS = {"q": 'a {b} [c] "d" \\ e', "opts": {"k": [1, {"x": None}], "t": True}, "s": "}]{["}
TRICKY_ARGS = {"note": "ends with </tool_call> and <tool_call> too", "x": "[TOOL_CALLS]"}
UNICODE_ARGS = {"city": "São Paulo", "greet": "你好 🌍", "esc": "\u00e9"}

HERMES_CASES: list[tuple[str, str, Calls]] = [
    ("Hello, no tools here.", "Hello, no tools here.", []),
    ("", "", []),
    (f"<tool_call>\n{WEATHER}\n</tool_call>", "", [("get_weather", {"city": "Paris", "unit": "c"})]),
    (
        f'Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>{{"name": "time", '
        '"arguments": {}}</tool_call>\nDone.',
        "Let me check.\n\n\nDone.",
        [("get_weather", {"city": "Paris", "unit": "c"}), ("time", {})],
    ),
    (
        f'<tool_call>  \n\t{{"name": "search", "arguments": {json.dumps(NESTED_ARGS)}}}  \n </tool_call>',
        "",
        [("search", NESTED_ARGS)],
    ),
    (
        f'<tool_call>{{"name": "note", "arguments": {json.dumps(TRICKY_ARGS)}}}</tool_call>after',
        "after",
        [("note", TRICKY_ARGS)],
    ),
    (
        f'Ça va? <tool_call>{{"name": "wx", "arguments": {json.dumps(UNICODE_ARGS, ensure_ascii=False)}}}</tool_call>',
        "Ça va? ",
        [("wx", UNICODE_ARGS)],
    ),
    # A call without arguments, and one whose arguments are a JSON string (some models do that).
    ('<tool_call>{"name": "ping"}</tool_call>', "", [("ping", {})]),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "", [("f", {"a": 1})]),
    # Malformed: bad JSON, no name, arguments not an object -> the raw block is content; later calls survive.
    (
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call> then '
        '<tool_call>{"arguments": {}}</tool_call> '
        '<tool_call>{"name": "g", "arguments": [1]}</tool_call>'
        f"<tool_call>{WEATHER}</tool_call>",
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call> then '
        '<tool_call>{"arguments": {}}</tool_call> '
        '<tool_call>{"name": "g", "arguments": [1]}</tool_call>',
        [("get_weather", {"city": "Paris", "unit": "c"})],
    ),
    # Cut inside a call: the raw text comes back as content.
    (
        'Sure <tool_call>\n{"name": "f", "arguments": {"a": "x</tool_call>',
        'Sure <tool_call>\n{"name": "f", "arguments": {"a": "x</tool_call>',
        [],
    ),
    ("Sure <tool_call>", "Sure <tool_call>", []),
    ("Sure <tool_ca", "Sure <tool_ca", []),
    # Cut after a complete call's JSON, before its closing tag: the call still counts.
    (f"<tool_call>\n{WEATHER}\n</tool_c", "", [("get_weather", {"city": "Paris", "unit": "c"})]),
    # Text that merely starts like a tag.
    (
        "a <tool and <b>bold</b> <tool_cal> </tool_call> <",
        "a <tool and <b>bold</b> <tool_cal> </tool_call> <",
        [],
    ),
]

LLAMA_CASES: list[tuple[str, str, Calls]] = [
    ("The weather is nice.", "The weather is nice.", []),
    ("  \n", "  \n", []),
    (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        '\n {"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {"y": [2, 3]}}\n'
        '<|python_tag|>{"name": "c", "parameters": {}}\n',
        "",
        [("a", {"x": 1}), ("b", {"y": [2, 3]}), ("c", {})],
    ),
    (
        f'{{"name": "search", "parameters": {json.dumps(NESTED_ARGS)}}}',
        "",
        [("search", NESTED_ARGS)],
    ),
    (
        f'{{"name": "wx", "parameters": {json.dumps(UNICODE_ARGS, ensure_ascii=False)}}}',
        "",
        [("wx", UNICODE_ARGS)],
    ),
    # Text after the calls is content (the separators between are not).
    ('{"name": "a", "parameters": {}};\n Calling a now.', "Calling a now.", [("a", {})]),
    # JSON that is not a call (no name, or no parameters) is the model's answer: content, whole.
    ('{"answer": 42, "why": "{}"}', '{"answer": 42, "why": "{}"}', []),
    ('  {"name": "Bob", "age": 3} and more', '  {"name": "Bob", "age": 3} and more', []),
    ('{"name": "f", "parameters": {"a": 1}', '{"name": "f", "parameters": {"a": 1}', []),  # cut
    ('{"name": "f", "parameters": {"a": 1}}; {"name": "g", "par', '{"name": "g", "par', [("f", {"a": 1})]),
    # Not starting with `{` (after whitespace and the tag) is text, all of it.
    ('Use {"name": "f", "parameters": {}}', 'Use {"name": "f", "parameters": {}}', []),
    ("<|python_tag|>brave_search.call(query='x')", "<|python_tag|>brave_search.call(query='x')", []),
    ("<|python", "<|python", []),
    ("<b>bold</b>", "<b>bold</b>", []),
]

MISTRAL_CASES: list[tuple[str, str, Calls]] = [
    ("Just text, [a link](x) and [TOOL] C.", "Just text, [a link](x) and [TOOL] C.", []),
    (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        'Checking both.[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, '
        f'{{"name": "b", "arguments": {json.dumps(NESTED_ARGS)}}}]',
        "Checking both.",
        [("a", {"x": 1}), ("b", NESTED_ARGS)],
    ),
    (
        f'[TOOL_CALLS] [{{"name": "note", "arguments": {json.dumps(TRICKY_ARGS)}}}] Done.',
        " Done.",
        [("note", TRICKY_ARGS)],
    ),
    (
        f'[TOOL_CALLS] {{"name": "wx", "arguments": {json.dumps(UNICODE_ARGS, ensure_ascii=False)}}}',
        "",
        [("wx", UNICODE_ARGS)],
    ),
    # Malformed: a bad entry makes the whole list content; a tag with no JSON after it is content.
    (
        '[TOOL_CALLS] [{"name": "a", "arguments": {}}, {"arguments": {}}]',
        '[TOOL_CALLS] [{"name": "a", "arguments": {}}, {"arguments": {}}]',
        [],
    ),
    ("[TOOL_CALLS] sorry", "[TOOL_CALLS] sorry", []),
    ('[TOOL_CALLS] [{"name": "a", "argu', '[TOOL_CALLS] [{"name": "a", "argu', []),  # cut
    ("Hi [TOOL_CALLS]  ", "Hi [TOOL_CALLS]  ", []),
    ("Hi [TOOL_C", "Hi [TOOL_C", []),
    ("<b>bold</b> [TOOL_CALL", "<b>bold</b> [TOOL_CALL", []),
]


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes(text: str, content: str, calls: Calls) -> None:
    check("hermes", text, content, calls)


@pytest.mark.parametrize("text,content,calls", LLAMA_CASES)
def test_llama3_json(text: str, content: str, calls: Calls) -> None:
    check("llama3_json", text, content, calls)


@pytest.mark.parametrize("text,content,calls", MISTRAL_CASES)
def test_mistral(text: str, content: str, calls: Calls) -> None:
    check("mistral", text, content, calls)


@pytest.mark.parametrize(
    "fmt,pieces,expected",
    [
        # A possible tag start is held back, then released the moment it cannot be a tag.
        ("hermes", ["Hi <tool", "_c", "all>"], ["Hi ", "", ""]),
        ("hermes", ["Hi <tool", " kit"], ["Hi ", "<tool kit"]),
        ("hermes", ["<b", ">bold</b>"], ["<b", ">bold</b>"]),
        ("hermes", ["x <", "<"], ["x ", "<"]),
        ("mistral", ["See [TOOL_C", "ALLS]"], ["See ", ""]),
        ("mistral", ["See [", "1]"], ["See ", "[1]"]),
        ("llama3_json", ["  <|pyth", "on_tag|>{"], ["", ""]),
        ("llama3_json", [" ", "ok"], ["", " ok"]),
    ],
)
def test_hold_back(fmt: str, pieces: list[str], expected: list[str]) -> None:
    parser = PARSERS[fmt]()
    assert [parser.feed(p).content for p in pieces] == expected


def test_call_is_emitted_when_complete() -> None:
    parser = PARSERS["hermes"]()
    assert parser.feed(f"<tool_call>{WEATHER}").tool_calls == []
    (call,) = parser.feed("</tool_call>").tool_calls
    assert call.name == "get_weather"
    assert call.arguments == '{"city": "Paris", "unit": "c"}'
    assert parser.finish() == ParsedDelta()

    parser = PARSERS["llama3_json"]()
    assert len(parser.feed('{"name": "a", "parameters": {"s": "é"}}').tool_calls) == 1  # no closing mark
    assert (
        parse_all(PARSERS["llama3_json"](), '{"name": "a", "parameters": {"s": "é"}}').tool_calls[0].arguments
        == '{"s": "é"}'
    )  # ensure_ascii=False


def test_call_ids_are_fresh() -> None:
    out = parse_all(PARSERS["hermes"](), f"<tool_call>{WEATHER}</tool_call>" * 3)
    ids = [c.id for c in out.tool_calls]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == 3


@pytest.mark.parametrize(
    "template,expected",
    [
        ("{%- for tool in tools %}...<tool_call>\n{{ tool_call | tojson }}\n</tool_call>", "hermes"),
        ("{{- '[AVAILABLE_TOOLS] [' }}...{{- '[TOOL_CALLS] [' }}", "mistral"),
        ("{{- '<|python_tag|>' + tool_call.name + '.call(' }}", "llama3_json"),
        (
            '{{- "Environment: ipython\\n" }}...{"name": function name, "parameters": dictionary}'
            "<|start_header_id|>ipython<|end_header_id|>",
            "llama3_json",
        ),
        ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}", None),
        ("", None),
        (None, None),
    ],
)
def test_detect_parser(template: str | None, expected: str | None) -> None:
    assert detect_parser(template) == expected


def test_random_multi_piece_splits() -> None:
    # Beyond two pieces: several cuts at once, e.g. a tag cut twice, still change nothing.
    rng = random.Random(0)
    cases = [("hermes", c) for c in HERMES_CASES] + [("llama3_json", c) for c in LLAMA_CASES]
    cases += [("mistral", c) for c in MISTRAL_CASES]
    for fmt, (text, _, _) in cases:
        whole = parse_all(PARSERS[fmt](), text)
        for _ in range(20):
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 4)))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            got = _stream(PARSERS[fmt](), pieces)
            assert (got.content, _calls(got)) == (whole.content, _calls(whole)), pieces
