"""Request fields of the HTTP API (server/protocol.py): structured outputs, logit_bias, and the policy that no
field is dropped silently.

Each constraint a request can spell (OpenAI's response_format, vLLM's structured_outputs and guided_*,
SGLang's regex / ebnf / sampling_params.json_schema) must reach the fake engine as the right
StructuredOutput, and a bad one must be a 400 naming its field. The field-list tests walk the installed
`openai` package's own request types, so a field OpenAI adds later fails here until it is handled or refused.
"""

from __future__ import annotations

import json
import logging
import typing
import uuid
from typing import Any

import openai
import pytest
import test_api
from api_fakes import MODEL, FakeEngine, chat_body, make_app
from fastapi.testclient import TestClient
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params
from pydantic import BaseModel

from minisgl_cli.engine.request import SamplingParams, check_for_model
from minisgl_cli.engine.structured import StructuredOutput
from minisgl_cli.server import protocol as p

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
# The API tests' fixtures: a fake engine and a client over an app on it.
engine = test_api.engine
client = test_api.client


def body_for(url: str, **fields: Any) -> dict[str, Any]:
    return chat_body("a b", **fields) if url == CHAT else {"model": MODEL, "prompt": "a b", **fields}


def sent(client: TestClient, engine: FakeEngine, url: str, **fields: Any) -> SamplingParams:
    """The SamplingParams the engine got for a request with these fields (which must succeed)."""
    r = client.post(url, json=body_for(url, **fields))
    assert r.status_code == 200, r.text
    return engine.calls[-1].sampling


def assert_error(response: Any, param: str) -> str:
    """A 400 in OpenAI's error shape naming `param`; returns the message."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"]
    return error["message"]


# ---- response_format and the vLLM / SGLang constraints


def json_schema_format(**json_schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": json_schema}


@pytest.mark.parametrize("url", [CHAT, COMPLETIONS])
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"response_format": {"type": "text"}}, None),
        (
            {"response_format": {"type": "json_object"}},
            StructuredOutput("json_object", "", "response_format"),
        ),
        (
            {"response_format": json_schema_format(name="a", schema=SCHEMA, strict=True, description="d")},
            StructuredOutput.json_schema(SCHEMA, param="response_format"),
        ),
        (  # vLLM is lenient: no name, strict null
            {"response_format": json_schema_format(schema=SCHEMA, strict=None)},
            StructuredOutput.json_schema(SCHEMA, param="response_format"),
        ),
        (  # no schema: any JSON object
            {"response_format": json_schema_format(name="anything")},
            StructuredOutput("json_object", "", "response_format"),
        ),
        (
            {"structured_outputs": {"json": SCHEMA}},
            StructuredOutput.json_schema(SCHEMA, param="structured_outputs.json"),
        ),
        (
            {"structured_outputs": {"json": json.dumps(SCHEMA)}},
            StructuredOutput("json_schema", json.dumps(SCHEMA), "structured_outputs.json"),
        ),
        (
            {"structured_outputs": {"regex": "[a-z]+"}},
            StructuredOutput("regex", "[a-z]+", "structured_outputs.regex"),
        ),
        (
            {"structured_outputs": {"choice": ["yes", "no"]}},
            StructuredOutput.choice(["yes", "no"], param="structured_outputs.choice"),
        ),
        (
            {"structured_outputs": {"grammar": 'root ::= "a" | "b"'}},
            StructuredOutput("grammar", 'root ::= "a" | "b"', "structured_outputs.grammar"),
        ),
        (
            {"structured_outputs": {"json_object": True}},
            StructuredOutput("json_object", "", "structured_outputs.json_object"),
        ),
        ({"structured_outputs": {"json_object": False}}, None),
        ({"guided_json": SCHEMA}, StructuredOutput.json_schema(SCHEMA, param="guided_json")),
        ({"guided_regex": "\\d+"}, StructuredOutput("regex", "\\d+", "guided_regex")),
        ({"guided_choice": ["x", "y"]}, StructuredOutput.choice(["x", "y"], param="guided_choice")),
        ({"guided_grammar": 'root ::= "a"'}, StructuredOutput("grammar", 'root ::= "a"', "guided_grammar")),
        ({"regex": "(yes|no)"}, StructuredOutput("regex", "(yes|no)", "regex")),
        ({"ebnf": 'root ::= "a"'}, StructuredOutput("grammar", 'root ::= "a"', "ebnf")),
        # A format that constrains nothing is no second constraint.
        (
            {"response_format": {"type": "text"}, "guided_regex": "a"},
            StructuredOutput("regex", "a", "guided_regex"),
        ),
        ({}, None),
    ],
)
def test_constraints_reach_the_engine(
    client: TestClient, engine: FakeEngine, url: str, fields: dict, expected: StructuredOutput | None
) -> None:
    assert sent(client, engine, url, **fields).structured == expected


@pytest.mark.parametrize(
    ("sampling_params", "expected"),
    [
        (
            {"json_schema": json.dumps(SCHEMA)},
            StructuredOutput("json_schema", json.dumps(SCHEMA), "sampling_params.json_schema"),
        ),
        ({"json_schema": SCHEMA}, StructuredOutput.json_schema(SCHEMA, param="sampling_params.json_schema")),
        ({"regex": "a+"}, StructuredOutput("regex", "a+", "sampling_params.regex")),
        ({"ebnf": 'root ::= "a"'}, StructuredOutput("grammar", 'root ::= "a"', "sampling_params.ebnf")),
    ],
)
def test_native_constraints_reach_the_engine(
    client: TestClient, engine: FakeEngine, sampling_params: dict, expected: StructuredOutput
) -> None:
    r = client.post("/generate", json={"text": "a b", "sampling_params": sampling_params})
    assert r.status_code == 200, r.text
    assert engine.calls[-1].sampling.structured == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": json_schema_format(name="a", schema={"type": "nothing"})}, "response_format"),
        ({"response_format": json_schema_format(name="a", schema=[1])}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {}}, "response_format.type"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": "[1, 2]"}}, "structured_outputs.json"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "no root here"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"structural_tag": {"type": "x"}}}, "structured_outputs.structural_tag"),
        ({"guided_json": {"type": "nothing"}}, "guided_json"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_choice": ["", "b"]}, "guided_choice"),
        ({"guided_grammar": 'root ::= "a" |'}, "guided_grammar"),
        ({"regex": "a{2,1}"}, "regex"),
        ({"ebnf": "root ::= undefined_rule"}, "ebnf"),
    ],
)
@pytest.mark.parametrize("url", [CHAT, COMPLETIONS])
def test_invalid_constraints_are_400(
    client: TestClient, engine: FakeEngine, url: str, fields: dict, param: str
) -> None:
    assert_error(client.post(url, json=body_for(url, **fields)), param)
    assert engine.calls == []


@pytest.mark.parametrize(
    ("sampling_params", "param"),
    [
        ({"json_schema": "{"}, "sampling_params.json_schema"),
        ({"regex": "[z-a]"}, "sampling_params.regex"),
        ({"ebnf": "root ::="}, "sampling_params.ebnf"),
    ],
)
def test_invalid_native_constraints_are_400(client: TestClient, sampling_params: dict, param: str) -> None:
    r = client.post("/generate", json={"text": "a", "sampling_params": sampling_params})
    assert_error(r, param)


@pytest.mark.parametrize(
    ("fields", "first", "second"),
    [
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "response_format",
            "guided_regex",
        ),
        (
            {"structured_outputs": {"regex": "a", "choice": ["b"]}},
            "structured_outputs.regex",
            "structured_outputs.choice",
        ),
        ({"guided_json": SCHEMA, "regex": "a"}, "guided_json", "regex"),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "regex", "ebnf"),
        (
            {"structured_outputs": {"grammar": 'root ::= "a"'}, "guided_choice": ["b"]},
            "structured_outputs.grammar",
            "guided_choice",
        ),
    ],
)
def test_two_constraints_are_400_naming_both(
    client: TestClient, engine: FakeEngine, fields: dict, first: str, second: str
) -> None:
    for url in (CHAT, COMPLETIONS):
        message = assert_error(client.post(url, json=body_for(url, **fields)), second)
        assert f"'{first}'" in message and f"'{second}'" in message
    r = client.post("/generate", json={"text": "a", "sampling_params": {"json_schema": "{}", "regex": "a"}})
    assert "'sampling_params.json_schema'" in assert_error(r, "sampling_params.regex")
    assert engine.calls == []


def test_openai_client_sends_response_format_and_extra_body(engine: FakeEngine) -> None:
    app, _ = make_app(engine)
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        response_format: Any = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a"}], response_format=response_format
        )
        assert engine.calls[-1].sampling.structured == StructuredOutput.json_schema(SCHEMA)
        client.completions.create(model=MODEL, prompt="a", extra_body={"guided_regex": "[0-9]+"})
        assert engine.calls[-1].sampling.structured == StructuredOutput("regex", "[0-9]+", "guided_regex")
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "a"}], extra_body={"guided_regex": "("}
            )
        assert info.value.body["param"] == "guided_regex"  # type: ignore[index]


# ---- logit_bias


@pytest.mark.parametrize("url", [CHAT, COMPLETIONS])
def test_logit_bias_keys_become_token_ids(client: TestClient, engine: FakeEngine, url: str) -> None:
    sampling = sent(client, engine, url, logit_bias={"50256": -100, "7": 2.5, "0": 100})
    assert sampling.logit_bias == {50256: -100.0, 7: 2.5, 0: 100.0}
    assert sent(client, engine, url, logit_bias={}).logit_bias == {}
    assert sent(client, engine, url, logit_bias=None).logit_bias == {}


def test_native_logit_bias(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/generate", json={"text": "a", "sampling_params": {"logit_bias": {"3": 1}}})
    assert r.status_code == 200 and engine.calls[-1].sampling.logit_bias == {3: 1.0}


@pytest.mark.parametrize(
    "bias",
    [
        {"abc": 1},
        {"-1": 1},
        {" 5": 1},  # int() would take it, and {"5", " 5"} would merge
        {"5.0": 1},
        {"٣": 1},  # an Arabic-Indic digit: str.isdigit() is True for it
        {"5": True},
        {"5": "1"},
        {"5": 100.5},
        {"5": -101},
        {"5": None},
        [1, 2],
    ],
)
def test_bad_logit_bias_is_400(client: TestClient, engine: FakeEngine, bias: Any) -> None:
    for url in (CHAT, COMPLETIONS):
        assert_error(client.post(url, json=body_for(url, logit_bias=bias)), "logit_bias")
    assert engine.calls == []


def test_out_of_vocabulary_logit_bias_is_refused_before_it_runs() -> None:
    """check_for_model runs in the tokenizer worker (and in the in-process LLM) before a request is queued."""
    check_for_model(SamplingParams(logit_bias={99: 1.0}), 100, has_tokenizer=True)
    with pytest.raises(p.InvalidParameter, match="token 100, outside the model's vocabulary of 100") as info:
        check_for_model(SamplingParams(logit_bias={5: 1.0, 100: 1.0, 200: 2.0}), 100, has_tokenizer=True)
    assert info.value.param == "logit_bias"


def test_constraints_and_stop_strings_need_a_tokenizer() -> None:
    regex = SamplingParams(structured=StructuredOutput("regex", "a", "guided_regex"))
    check_for_model(regex, 10, has_tokenizer=True)
    with pytest.raises(p.InvalidParameter, match="needs a tokenizer") as info:
        check_for_model(regex, 10, has_tokenizer=False)
    assert info.value.param == "guided_regex"
    with pytest.raises(p.InvalidParameter, match="stop strings need a tokenizer") as info:
        check_for_model(SamplingParams(stop=["x"]), 10, has_tokenizer=False)
    assert info.value.param == "stop"


# ---- every OpenAI field: handled, a no-op, or refused by name

# Fields that work: covered here and in test_api.py.
CHAT_HANDLED = {
    "messages", "model", "max_tokens", "max_completion_tokens", "n", "stop", "temperature", "top_p", "seed",
    "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs", "stream_options", "response_format",
    "logit_bias", "tools", "tool_choice", "parallel_tool_calls",
}  # fmt: skip
COMPLETION_HANDLED = {
    "prompt", "model", "max_tokens", "n", "stop", "temperature", "top_p", "seed", "frequency_penalty",
    "presence_penalty", "logprobs", "stream_options", "logit_bias",
}  # fmt: skip
# Accepted and ignored: they cannot change the output.
CHAT_NOOPS = {
    "user": "user-1",
    "metadata": {"k": "v"},
    "safety_identifier": "hash",
    "prompt_cache_key": "key",
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"mode": "implicit", "ttl": "30m"},
}
COMPLETION_NOOPS = {"user": "user-1"}
# Refused with a 400 naming them: one value each that asks for something, and the values accepted.
CHAT_REFUSED: dict[str, tuple[Any, list[Any]]] = {
    "functions": ([{"name": "f"}], [None, []]),
    "function_call": ("auto", [None, "none"]),
    "audio": ({"voice": "alloy", "format": "wav"}, [None]),
    "modalities": (["text", "audio"], [None, ["text"]]),
    "prediction": ({"type": "content", "content": "x"}, [None]),
    "reasoning_effort": ("low", [None]),
    "verbosity": ("low", [None]),
    "web_search_options": ({}, [None]),
    "moderation": ({"model": "omni-moderation-latest"}, [None]),
    "service_tier": ("flex", [None, "auto", "default"]),
    "store": (True, [None, False]),
}
COMPLETION_REFUSED: dict[str, tuple[Any, list[Any]]] = {
    "echo": (True, [None, False]),
    "suffix": ("tail", [None, ""]),
    "best_of": (3, [None, 1]),  # best_of == n is accepted
}


def openai_fields(typed_dict: type) -> set[str]:
    return set(typing.get_type_hints(typed_dict))


def declared(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


def refused_fields(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items() if p.refusal(info)}


@pytest.mark.parametrize(
    ("params", "model", "handled", "noops", "refused"),
    [
        (
            chat_params.CompletionCreateParamsBase,
            p.ChatCompletionRequest,
            CHAT_HANDLED,
            CHAT_NOOPS,
            CHAT_REFUSED,
        ),
        (
            completion_params.CompletionCreateParamsBase,
            p.CompletionRequest,
            COMPLETION_HANDLED,
            COMPLETION_NOOPS,
            COMPLETION_REFUSED,
        ),
    ],
    ids=["chat", "completions"],
)
def test_every_openai_field_is_classified(
    params: type, model: type[BaseModel], handled: set[str], noops: dict, refused: dict
) -> None:
    fields = openai_fields(params)
    unclassified = fields - handled - set(noops) - set(refused)
    assert not unclassified, f"OpenAI fields neither handled nor refused: {sorted(unclassified)}"
    assert not (fields - declared(model)), "every OpenAI field must be declared, or it would be ignored"
    # best_of is checked in api.py (against n), every other refusal by its Refused mark.
    assert refused_fields(model) | ({"best_of"} & set(refused)) >= set(refused)


@pytest.mark.parametrize(("url", "noops"), [(CHAT, CHAT_NOOPS), (COMPLETIONS, COMPLETION_NOOPS)])
def test_noop_fields_are_accepted_and_change_nothing(
    client: TestClient, engine: FakeEngine, url: str, noops: dict
) -> None:
    baseline = sent(client, engine, url)
    for name, value in noops.items():
        assert sent(client, engine, url, **{name: value}) == baseline, name
    assert sent(client, engine, url, **noops) == baseline


@pytest.mark.parametrize(
    ("url", "name", "active", "accepted"),
    [(CHAT, name, *values) for name, values in CHAT_REFUSED.items()]
    + [(COMPLETIONS, name, *values) for name, values in COMPLETION_REFUSED.items()],
)
def test_refused_fields_are_400_by_name(
    client: TestClient, engine: FakeEngine, url: str, name: str, active: Any, accepted: list[Any]
) -> None:
    message = assert_error(client.post(url, json=body_for(url, **{name: active})), name)
    assert "not supported" in message
    assert engine.calls == []
    baseline = sent(client, engine, url)
    for value in accepted:
        assert sent(client, engine, url, **{name: value}) == baseline, (name, value)


def test_refused_values_are_compared_by_json_type(client: TestClient) -> None:
    # 0 == False in Python; "store": 0 is still not JSON's false.
    assert_error(client.post(CHAT, json=chat_body(store=0)), "store")
    assert_error(client.post(CHAT, json=chat_body(parallel_tool_calls=0)), "parallel_tool_calls")


MESSAGE_TYPES = [
    "ChatCompletionSystemMessageParam",
    "ChatCompletionDeveloperMessageParam",
    "ChatCompletionUserMessageParam",
    "ChatCompletionAssistantMessageParam",
    "ChatCompletionToolMessageParam",
    "ChatCompletionFunctionMessageParam",
]
MESSAGE_HANDLED = {"role", "content", "name", "tool_calls", "tool_call_id"}  # tool calls: test_tool_calls.py
MESSAGE_REFUSED = {
    "function_call": {"name": "f", "arguments": "{}"},
    "audio": {"id": "a1"},
    "refusal": "I cannot",
}


def test_every_openai_message_field_is_classified() -> None:
    import openai.types.chat as chat_types

    fields = set().union(*(openai_fields(getattr(chat_types, name)) for name in MESSAGE_TYPES))
    assert fields == MESSAGE_HANDLED | set(MESSAGE_REFUSED)
    assert declared(p.ChatMessage) >= fields
    assert refused_fields(p.ChatMessage) == set(MESSAGE_REFUSED)
    # The nested objects that have fields of their own.
    assert declared(p.StreamOptions) >= openai_fields(chat_types.ChatCompletionStreamOptionsParam)
    from openai.types.shared_params.response_format_json_schema import JSONSchema, ResponseFormatJSONSchema

    assert declared(p.ResponseFormat) >= openai_fields(ResponseFormatJSONSchema)
    assert declared(p.JsonSchemaFormat) >= openai_fields(JSONSchema)


@pytest.mark.parametrize(("name", "value"), MESSAGE_REFUSED.items())
def test_refused_message_fields_are_400_by_path(
    client: TestClient, engine: FakeEngine, name: str, value: Any
) -> None:
    role = "tool" if name == "tool_call_id" else "assistant"
    messages = [{"role": "user", "content": "a"}, {"role": role, "content": "b", name: value}]
    r = client.post(CHAT, json={"model": MODEL, "messages": messages})
    assert "not supported" in assert_error(r, f"messages[1].{name}")
    assert engine.calls == []
    # The null an OpenAI client's message.model_dump() carries is fine.
    messages[1][name] = None
    assert client.post(CHAT, json={"model": MODEL, "messages": messages}).status_code == 200


def test_function_messages_are_refused(client: TestClient) -> None:
    messages = [{"role": "function", "name": "f", "content": "42"}]
    assert_error(client.post(CHAT, json={"model": MODEL, "messages": messages}), "messages[0].role")


def test_message_names_reach_the_chat_template(client: TestClient, engine: FakeEngine) -> None:
    messages = [{"role": "user", "name": "ada", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert client.post(CHAT, json={"model": MODEL, "messages": messages}).status_code == 200
    assert engine.calls[-1].prompt.messages == [
        {"role": "user", "content": "a", "name": "ada"},
        {"role": "assistant", "content": "b"},
    ]


def test_replayed_assistant_message_from_the_openai_client(client: TestClient) -> None:
    # What `response.choices[0].message.model_dump()` gives, sent back as history.
    previous = openai.types.chat.ChatCompletionMessage(role="assistant", content="b").model_dump()
    messages = [{"role": "user", "content": "a"}, previous, {"role": "user", "content": "c"}]
    assert client.post(CHAT, json={"model": MODEL, "messages": messages}).status_code == 200


@pytest.mark.parametrize("url", [CHAT, COMPLETIONS])
def test_nulls_mean_the_default(client: TestClient, engine: FakeEngine, url: str) -> None:
    baseline = sent(client, engine, url)
    nulls = {"n": None, "stream": None, "logprobs": None, "ignore_eos": None, "stream_options": None}
    assert sent(client, engine, url, **nulls) == baseline
    assert len(engine.calls) == 2  # n null: one choice


# ---- unknown fields


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Names logged by other tests (the fuzzer's made-up ones too) must not count against the cap.
    monkeypatch.setattr(p, "_warned", set())


def unknown_name() -> str:
    return f"x_unknown_{uuid.uuid4().hex[:8]}"


def warnings_about(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == p.__name__ and name in r.getMessage()]


@pytest.mark.parametrize("url", [CHAT, COMPLETIONS])
def test_unknown_fields_are_ignored_and_logged_once(
    client: TestClient, engine: FakeEngine, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=p.__name__)
    baseline = sent(client, engine, url)
    name, other = unknown_name(), unknown_name()
    assert sent(client, engine, url, **{name: 1}) == baseline
    assert sent(client, engine, url, **{name: {"any": "thing"}, other: None}) == baseline
    (record,) = warnings_about(caplog, name)
    assert record.levelno == logging.WARNING and f"'{name}'" in record.getMessage()
    assert len(warnings_about(caplog, other)) == 1


def test_unknown_nested_fields_are_logged_by_path(
    client: TestClient, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=p.__name__)
    name = unknown_name()
    for _ in range(2):
        messages = [{"role": "user", "content": "a", name: 1}, {"role": "user", "content": "b", name: 2}]
        body = {
            "model": MODEL,
            "messages": messages,
            "response_format": {"type": "json_object", name: 1},
            "stream_options": {"include_usage": True, name: 1},
        }
        assert client.post(CHAT, json=body).status_code == 200
        r = client.post("/generate", json={"text": "a", name: 1, "sampling_params": {name: 1}})
        assert r.status_code == 200
    logged = sorted(r.getMessage().split("'")[1] for r in warnings_about(caplog, name))
    assert logged == sorted(
        [
            f"messages[].{name}",
            f"response_format.{name}",
            f"stream_options.{name}",
            name,
            f"sampling_params.{name}",
        ]
    )


def test_known_extras_still_work(client: TestClient, engine: FakeEngine) -> None:
    extras = {
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "stop_token_ids": [3],
    }
    sampling = sent(client, engine, CHAT, **extras)
    assert (sampling.top_k, sampling.min_p, sampling.repetition_penalty) == (5, 0.1, 1.1)
    assert sampling.ignore_eos and sampling.stop_token_ids == [3]


def test_unknown_field_warnings_are_capped(
    client: TestClient, engine: FakeEngine, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger=p.__name__)
    monkeypatch.setattr(p, "_MAX_WARNED", 3)
    names = [unknown_name() for _ in range(5)]
    for name in names:
        assert client.post(CHAT, json=chat_body(**{name: 1})).status_code == 200
    assert [len(warnings_about(caplog, name)) for name in names] == [1, 1, 1, 0, 0]
