"""Tool calling and reasoning on /v1/chat/completions (server/chat_output.py, the tool fields of protocol.py),
over the fake engine of api_fakes.py, which answers with its prompt's words: a user message written as a model's
output is what the parsers then read. References: the request OpenAI would accept and the response shapes of
its API (message.tool_calls, delta.tool_calls with index/id/type/function, finish_reason "tool_calls").
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from api_fakes import MODEL, FakeEngine, make_app
from fastapi.testclient import TestClient

from minisgl_cli.engine.structured import StructuredOutput
from minisgl_cli.engine.tokenize import ChatPrompt
from minisgl_cli.server.chat_output import required_schema

CHAT = "/v1/chat/completions"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
HERMES_CALL = '<tool_call> {"name": "get_weather", "arguments": {"city": "Paris"}} </tool_call>'


@pytest.fixture
def app() -> tuple[TestClient, FakeEngine]:
    app, engine = make_app(tool_call_parser="hermes", reasoning_parser="qwen3")
    return TestClient(app), engine


def body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def _stream(client: TestClient, payload: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", CHAT, json={**payload, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _assemble(chunks: list[dict[str, Any]]) -> tuple[str, str, list[dict[str, Any]], str | None]:
    """content, reasoning, tool calls and finish reason of a stream, put together as the openai client does."""
    content = reasoning = ""
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            reasoning += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(call["index"], {"function": {"name": "", "arguments": ""}})
                slot.update({k: v for k, v in call.items() if k in ("id", "type")})
                slot["function"]["name"] += call.get("function", {}).get("name") or ""
                slot["function"]["arguments"] += call.get("function", {}).get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    return content, reasoning, [calls[i] for i in sorted(calls)], finish


def test_auto_tool_calls_are_parsed_from_the_models_format(app: tuple[TestClient, FakeEngine]) -> None:
    client, engine = app
    payload = body(f"Let me check. {HERMES_CALL}", tools=[WEATHER, TIME])
    choice = client.post(CHAT, json=payload).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Let me check. "
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
        "city": "Paris"
    }
    # The tools reach the chat template; auto mode puts no grammar on the output.
    prompt = engine.calls[-1].prompt
    assert isinstance(prompt, ChatPrompt) and [t["function"]["name"] for t in prompt.tools] == [
        "get_weather",
        "get_time",
    ]
    assert engine.calls[-1].sampling.structured is None
    content, _, calls, finish = _assemble(_stream(client, payload))
    assert (content, finish) == ("Let me check. ", "tool_calls")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"


def test_a_named_tool_is_constrained_to_its_schema_and_its_output_is_the_arguments(
    app: tuple[TestClient, FakeEngine],
) -> None:
    client, engine = app
    choice = {"type": "function", "function": {"name": "get_weather"}}
    payload = body('{"city": "Rome"}', tools=[WEATHER, TIME], tool_choice=choice)
    message = client.post(CHAT, json=payload).json()["choices"][0]["message"]
    assert message["content"] is None
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]
    ] == [("get_weather", {"city": "Rome"})]
    structured = engine.calls[-1].sampling.structured
    assert structured == StructuredOutput.json_schema(WEATHER["function"]["parameters"], param="tool_choice")
    _, _, calls, finish = _assemble(_stream(client, payload))
    assert finish == "tool_calls" and calls[0]["function"]["name"] == "get_weather"


def test_required_makes_a_list_of_calls_and_parallel_false_allows_one(
    app: tuple[TestClient, FakeEngine],
) -> None:
    client, engine = app
    output = '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    payload = body(output, tools=[WEATHER, TIME], tool_choice="required")
    choice = client.post(CHAT, json=payload).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    names = [c["function"]["name"] for c in choice["message"]["tool_calls"]]
    assert names == ["get_time", "get_weather"]
    tools = [("get_weather", WEATHER["function"]["parameters"]), ("get_time", TIME["function"]["parameters"])]
    assert engine.calls[-1].sampling.structured == StructuredOutput.json_schema(
        required_schema(tools, parallel=True), param="tool_choice"
    )
    client.post(CHAT, json={**payload, "parallel_tool_calls": False})
    schema = json.loads(engine.calls[-1].sampling.structured.spec)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1


def test_a_constrained_call_cut_short_is_returned_as_text(app: tuple[TestClient, FakeEngine]) -> None:
    client, _ = app
    choice = {"type": "function", "function": {"name": "get_weather"}}
    payload = body('{"city": "Rome and more"}', tools=[WEATHER], tool_choice=choice, max_tokens=2)
    out = client.post(CHAT, json=payload).json()["choices"][0]
    assert out["finish_reason"] == "length" and "tool_calls" not in out["message"]
    assert out["message"]["content"] == '{"city": "Rome'


def test_tool_choice_none_offers_no_tools_and_reads_no_calls(app: tuple[TestClient, FakeEngine]) -> None:
    client, engine = app
    out = client.post(CHAT, json=body(HERMES_CALL, tools=[WEATHER], tool_choice="none")).json()["choices"][0]
    assert out["message"]["content"] == HERMES_CALL and "tool_calls" not in out["message"]
    assert out["finish_reason"] == "stop" and engine.calls[-1].prompt.tools is None


def test_a_tool_result_round_trips_to_the_template(app: tuple[TestClient, FakeEngine]) -> None:
    client, engine = app
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    r = client.post(CHAT, json={"model": MODEL, "messages": messages, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    sent = engine.calls[-1].prompt.messages
    # The arguments go to the template as an object: templates render them with tojson.
    assert sent[1]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        }
    ]
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize(
    ("extra", "param", "fragment"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope', which is not in"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs 'tools'"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "two tools are named 'get_weather'"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
         "tools[0].function.parameters", "nonsense"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "at most one"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "pattern"),
        ({"functions": [{"name": "f"}]}, "functions", "use 'tools'"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400_naming_the_field(
    app: tuple[TestClient, FakeEngine], extra: dict[str, Any], param: str, fragment: str
) -> None:
    client, engine = app
    payload = {**body("x"), "tools": [WEATHER], **extra}
    r = client.post(CHAT, json=payload)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert engine.calls == []


def test_auto_tools_without_a_parser_are_refused() -> None:
    app, engine = make_app()
    r = TestClient(app).post(CHAT, json=body("x", tools=[WEATHER]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "required" in r.json()["error"]["message"]
    # A named call needs no parser: the grammar makes the whole output the arguments.
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = TestClient(app).post(CHAT, json=body('{"city": "X"}', tools=[WEATHER], tool_choice=named))
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_reasoning_goes_to_reasoning_content(app: tuple[TestClient, FakeEngine]) -> None:
    client, engine = app
    payload = body(
        "<think> Paris is in France. </think> Paris.", chat_template_kwargs={"enable_thinking": True}
    )
    message = client.post(CHAT, json=payload).json()["choices"][0]["message"]
    assert message["reasoning_content"].strip() == "Paris is in France." and message["content"] == "Paris."
    assert engine.calls[-1].prompt.template_kwargs == {"enable_thinking": True}
    content, reasoning, _, finish = _assemble(_stream(client, payload))
    assert (content, reasoning.strip(), finish) == ("Paris.", "Paris is in France.", "stop")
    plain = client.post(CHAT, json=body("just an answer")).json()["choices"][0]["message"]
    assert plain == {"role": "assistant", "content": "just an answer"}  # no null extras, as OpenAI


def test_reasoning_then_a_tool_call(app: tuple[TestClient, FakeEngine]) -> None:
    client, _ = app
    payload = body(f"<think> I need the weather. </think> {HERMES_CALL}", tools=[WEATHER])
    message = client.post(CHAT, json=payload).json()["choices"][0]["message"]
    assert message["reasoning_content"].strip() == "I need the weather."
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    content, reasoning, calls, finish = _assemble(_stream(client, payload))
    assert reasoning.strip() == "I need the weather." and finish == "tool_calls" and len(calls) == 1


# ---- the template side: ChatPrompt through a tool-aware chat template

# A reduced Qwen-style template: tools in the system turn, calls as <tool_call> JSON, results as tool turns.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tools_history_and_template_options_reach_the_chat_template() -> None:
    from model_helpers import make_tiny_tokenizer

    from minisgl_cli.engine.tokenize import encode_prompt
    from minisgl_cli.errors import UsageError

    tok = make_tiny_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]  # fmt: skip
    prompt = ChatPrompt(messages, tools=[WEATHER], template_kwargs={"enable_thinking": False})
    text = tok.decode(encode_prompt(prompt, tok, 384))
    assert '"name": "get_weather"' in text and '"description": "The weather in a city."' in text
    call = text.split("<tool_call>")[1].split("</tool_call>")[0]
    assert json.loads(call) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert "<|im_start|>tool\nsunny" in text and text.endswith("<think></think><|im_start|>assistant\n")
    with pytest.raises(
        UsageError, match="chat template variable 'add_generation_prompt' is set by the request"
    ):
        encode_prompt(ChatPrompt(messages, template_kwargs={"add_generation_prompt": False}), tok, 384)


def test_the_served_models_parsers_come_from_its_files_or_the_flags(tmp_path: Any) -> None:
    from minisgl_cli.config import ServerConfig
    from minisgl_cli.model_source import ModelSource
    from minisgl_cli.server.output_parsers import pick_parsers

    template = "{% for m in messages %}{{ m.content }}{% endfor %}<tool_call> ... <think>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    source = ModelSource(name="m", path=tmp_path, hf_config={"model_type": "qwen3"})
    assert pick_parsers(ServerConfig(), source) == ("hermes", "qwen3")
    flags = ServerConfig(tool_call_parser="none", reasoning_parser="deepseek-r1")
    assert pick_parsers(flags, source) == (None, "deepseek-r1")
    bare = ModelSource(name="shape", path=None, hf_config={"model_type": "llama"})  # a built-in shape
    assert pick_parsers(ServerConfig(), bare) == (None, None)
