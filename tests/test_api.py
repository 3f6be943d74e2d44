"""The HTTP API (server/api.py) against a fake engine: shapes, streaming, errors, auth, disconnects.

FakeEngine (api_fakes.py) echoes its prompt's words back, one token per output, so every expected text
and count here is worked out by hand from the prompt. Requests go through starlette's TestClient, the
official openai client (on TestClient's transport), raw ASGI calls (to control exactly when a client
disconnects) and one real uvicorn server.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from api_fakes import CONTEXT_LENGTH, LONG_MESSAGE, MODEL, FakeEngine, chat_body, make_app
from fastapi import FastAPI
from fastapi.testclient import TestClient

from minisgl_cli.engine.request import SamplingParams

KEY = "sk-test-key"
Message = dict[str, Any]  # an ASGI message


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    app, _ = make_app(engine)
    with TestClient(app) as c:
        yield c


def sse_events(response: httpx.Response | Any) -> list[Any]:
    """The JSON events of an SSE body; asserts the framing and the final [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    events = []
    for block in blocks[:-2]:
        assert block.startswith("data: ")
        events.append(json.loads(block.removeprefix("data: ")))
    return events


def assert_error(response: Any, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "service_unavailable_error")
    assert error["param"] == param
    assert error["code"] == code
    return error


# ---- chat completions


def test_chat_completion_shape_and_usage(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json=chat_body("alpha beta gamma"))
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and abs(body["created"] - time.time()) < 600
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "alpha beta gamma"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "total_tokens": 6,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    (call,) = engine.calls
    assert call.prompt.messages == [{"role": "user", "content": "alpha beta gamma"}]
    assert not call.max_tokens_explicit


def test_chat_sampling_fields_reach_the_engine(client: TestClient, engine: FakeEngine) -> None:
    fields = {
        "temperature": 0.3,
        "top_p": 0.5,
        "top_k": 7,
        "min_p": 0.05,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "repetition_penalty": 1.2,
        "seed": 42,
        "stop": ["END", "###"],
        "stop_token_ids": [7, 9],
        "ignore_eos": True,
        "max_tokens": 5,
    }
    assert client.post("/v1/chat/completions", json=chat_body(**fields)).status_code == 200
    call = engine.calls[-1]
    expected = SamplingParams(**fields)  # type: ignore[arg-type]
    assert call.sampling == expected
    assert call.max_tokens_explicit


def test_omitted_sampling_fields_take_the_server_defaults(client: TestClient, engine: FakeEngine) -> None:
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
    sampling = engine.calls[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.max_tokens) == (0.7, 0.9, 64)
    assert sampling == SamplingParams(temperature=0.7, top_p=0.9, max_tokens=64)


def test_max_completion_tokens_and_length_finish(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json=chat_body("a b c d e", max_completion_tokens=2))
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "a b"
    assert choice["finish_reason"] == "length"
    assert engine.calls[-1].sampling.max_tokens == 2 and engine.calls[-1].max_tokens_explicit


def test_stop_string_is_cut(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=chat_body("one two END three", stop="END"))
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "one two"
    assert choice["finish_reason"] == "stop"
    assert r.json()["usage"]["completion_tokens"] == 3  # the stop token was generated


def test_content_parts_and_roles(client: TestClient, engine: FakeEngine) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "x y"}, {"type": "text", "text": "z"}]},
        {"role": "assistant", "content": None},
    ]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "unknown_field": 1})
    assert r.status_code == 200
    assert engine.calls[-1].prompt.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "x y\nz"},
        {"role": "assistant", "content": ""},
    ]


def test_n_choices_use_consecutive_seeds_and_sum_usage(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json=chat_body("p q r s", n=3, seed=10, max_tokens=2))
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "p q" for c in body["choices"])
    assert sorted(call.sampling.seed for call in engine.calls) == [10, 11, 12]
    # The prompt counts once, the completions of all three choices add up.
    assert body["usage"]["prompt_tokens"] == 4
    assert body["usage"]["completion_tokens"] == 6
    assert body["usage"]["total_tokens"] == 10


def test_n_without_seed_leaves_seeds_to_the_engine(client: TestClient, engine: FakeEngine) -> None:
    client.post("/v1/chat/completions", json=chat_body(n=2))
    assert [call.sampling.seed for call in engine.calls] == [None, None]


def test_cached_tokens_are_reported_once_per_prompt() -> None:
    app, engine = make_app(FakeEngine(cached_tokens=2))
    with TestClient(app) as c:
        usage = c.post("/v1/chat/completions", json=chat_body("a b c", n=2)).json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 2}
    assert usage["prompt_tokens"] == 3 and usage["completion_tokens"] == 6


def test_chat_logprobs_shape(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json=chat_body("hi there", logprobs=True, top_logprobs=2))
    assert engine.calls[-1].sampling.logprobs == 2
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content == [
        {
            "token": "hi",
            "logprob": -0.125,
            "bytes": list(b"hi"),
            "top_logprobs": [
                {"token": "hi", "logprob": -0.125, "bytes": list(b"hi")},
                {"token": "alt1", "logprob": -1.125, "bytes": list(b"alt1")},
            ],
        },
        {
            "token": " there",
            "logprob": -0.25,
            "bytes": list(b" there"),
            "top_logprobs": [
                {"token": " there", "logprob": -0.25, "bytes": list(b" there")},
                {"token": "alt1", "logprob": -1.25, "bytes": list(b"alt1")},
            ],
        },
    ]


def test_chat_logprobs_without_top(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json=chat_body("hi", logprobs=True))
    assert engine.calls[-1].sampling.logprobs == 0
    assert r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []


def test_chat_stream_chunks(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=chat_body("a b", n=2, stream=True))
    assert r.status_code == 200
    events = sse_events(r)
    assert {e["id"] for e in events} == {events[0]["id"]} and events[0]["id"].startswith("chatcmpl-")
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == MODEL for e in events)
    assert all("usage" not in e for e in events)
    for index in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert [c["delta"] for c in mine] == [
            {"role": "assistant", "content": ""},
            {"content": "a"},
            {"content": " b"},
            {},
        ]
        assert [c["finish_reason"] for c in mine] == [None, None, None, "stop"]


def test_slow_streams_run_to_their_end() -> None:
    # Tokens arrive long after the handler has returned the response: the stream alone keeps them coming.
    app, engine = make_app(FakeEngine(token_delay=0.02))
    with TestClient(app) as client:
        for path, body in (
            ("/v1/chat/completions", chat_body("a b c d e", n=2, stream=True)),
            ("/v1/completions", {"prompt": "a b c d e", "stream": True}),
            ("/generate", {"text": "a b c d e", "stream": True}),
        ):
            events = sse_events(client.post(path, json=body))
            finishes = [c["finish_reason"] for e in events for c in e.get("choices", [])] or [
                e["meta_info"]["finish_reason"] for e in events
            ]
            assert finishes.count("stop") == body.get("n", 1)
    assert engine.aborted == []


def test_chat_stream_include_usage(client: TestClient) -> None:
    body = chat_body("a b c", n=2, max_tokens=2, stream=True, stream_options={"include_usage": True})
    events = sse_events(client.post("/v1/chat/completions", json=body))
    *chunks, last = events
    assert all(e["usage"] is None for e in chunks)
    assert last["choices"] == []
    assert last["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_chat_stream_logprobs_and_stop_text(client: TestClient) -> None:
    body = chat_body("x STOP y", stop=["STOP"], logprobs=True, stream=True)
    events = sse_events(client.post("/v1/chat/completions", json=body))
    choices = [e["choices"][0] for e in events]
    # The stop token's text is cut, but its logprobs still come (with an empty content delta).
    assert [c["delta"] for c in choices] == [
        {"role": "assistant", "content": ""},
        {"content": "x"},
        {"content": ""},
        {},
    ]
    assert [c["logprobs"]["content"][0]["token"] if c["logprobs"] else None for c in choices] == [
        None,
        "x",
        " STOP",
        None,
    ]


# ---- text completions


def test_completion_batch_indices_and_usage(client: TestClient, engine: FakeEngine) -> None:
    body = {"model": MODEL, "prompt": ["a b", "c d e"], "n": 2, "max_tokens": 5}
    r = client.post("/v1/completions", json=body)
    data = r.json()
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
    assert [(c["index"], c["text"]) for c in data["choices"]] == [
        (0, "a b"),
        (1, "a b"),
        (2, "c d e"),
        (3, "c d e"),
    ]
    assert data["usage"]["prompt_tokens"] == 2 + 3
    assert data["usage"]["completion_tokens"] == 2 * 2 + 3 * 2
    assert sorted(call.prompt for call in engine.calls) == ["a b", "a b", "c d e", "c d e"]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("one two", ["one two"]),
        ([5, 6, 7], [[5, 6, 7]]),
        (["x", "y z"], ["x", "y z"]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompt_forms(client: TestClient, engine: FakeEngine, prompt: Any, expected: list) -> None:
    r = client.post("/v1/completions", json={"prompt": prompt})
    assert r.status_code == 200, r.text
    assert [call.prompt for call in engine.calls] == expected
    if isinstance(expected[0], list):
        assert r.json()["choices"][0]["text"] == " ".join(f"t{t}" for t in expected[0])


def test_completion_legacy_logprobs(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "ab cde f", "logprobs": 2})
    logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs == {
        "tokens": ["ab", " cde", " f"],
        "token_logprobs": [-0.125, -0.25, -0.375],
        "top_logprobs": [
            {"ab": -0.125, "alt1": -1.125},
            {" cde": -0.25, "alt1": -1.25},
            {" f": -0.375, "alt1": -1.375},
        ],
        "text_offset": [0, 2, 6],
    }


def test_completion_stream_logprob_offsets_continue(client: TestClient) -> None:
    body = {"prompt": "ab cde f", "logprobs": 0, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(client.post("/v1/completions", json=body))
    assert all(e["object"] == "text_completion" for e in events)
    *chunks, usage = events
    texts = [c["choices"][0]["text"] for c in chunks]
    assert texts == ["ab", " cde", " f", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    offsets = [c["choices"][0]["logprobs"]["text_offset"] for c in chunks[:-1]]
    assert offsets == [[0], [2], [6]]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


# ---- native /generate


def test_generate_text_and_ids(client: TestClient, engine: FakeEngine) -> None:
    r = client.post(
        "/generate", json={"input_ids": [11, 12, 13], "sampling_params": {"max_new_tokens": 2, "seed": 3}}
    )
    assert r.json() == {
        "text": "t11 t12",
        "output_ids": [11, 12],
        "meta_info": {
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "cached_tokens": 0,
            "finish_reason": "length",
        },
    }
    assert engine.calls[-1].sampling == SamplingParams(temperature=0.7, top_p=0.9, max_tokens=2, seed=3)
    assert engine.calls[-1].max_tokens_explicit
    r = client.post("/generate", json={"text": "hello world"})
    assert r.json()["text"] == "hello world" and r.json()["meta_info"]["finish_reason"] == "stop"


def test_generate_stream_deltas(client: TestClient) -> None:
    events = sse_events(client.post("/generate", json={"input_ids": [4, 5], "stream": True}))
    assert [(e["text"], e["output_ids"], e["meta_info"]["completion_tokens"]) for e in events] == [
        ("t4", [4], 1),
        (" t5", [5], 2),
    ]
    assert [e["meta_info"]["finish_reason"] for e in events] == [None, "stop"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"text": "a", "input_ids": [1]},
        {"input_ids": []},
        {"text": "a", "sampling_params": {"max_new_tokens": 0}},
    ],
)
def test_generate_bad_requests(client: TestClient, body: dict) -> None:
    r = client.post("/generate", json=body)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


# ---- models, health


def test_models(client: TestClient) -> None:
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    (card,) = data["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "minisgl"
    assert card["max_model_len"] == CONTEXT_LENGTH and isinstance(card["created"], int)


def test_health_follows_the_engine(client: TestClient, engine: FakeEngine) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    engine.healthy = False
    r = client.get("/health")
    assert_error(r, 503)
    assert r.headers["retry-after"] == "1"


def test_lifespan_starts_and_closes_the_engine() -> None:
    app, engine = make_app()
    with TestClient(app):
        assert (engine.starts, engine.closes) == (1, 0)
    assert (engine.starts, engine.closes) == (1, 1)


def test_openapi_describes_the_request_bodies(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    ref = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert ref["$ref"].endswith("/ChatCompletionRequest")
    properties = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "temperature", "n", "stream", "logprobs", "top_logprobs"} <= set(properties)


# ---- errors


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat_body(temperature=-1), "temperature"),
        (chat_body(top_p=0), "top_p"),
        (chat_body(max_tokens=0), "max_tokens"),
        (chat_body(frequency_penalty=3), "frequency_penalty"),
        (chat_body(stop=[""]), "stop"),
        (chat_body(n=0), "n"),
        (chat_body(n=17), "n"),
        (chat_body(top_logprobs=21, logprobs=True), "top_logprobs"),
        (chat_body(top_logprobs=2), "top_logprobs"),
        (chat_body(temperature="hot"), "temperature"),
        (chat_body(seed=2**64), "seed"),
        ({"model": MODEL}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ],
)
def test_chat_invalid_parameters(client: TestClient, engine: FakeEngine, body: dict, param: str) -> None:
    assert_error(client.post("/v1/chat/completions", json=body), 400, param=param)
    assert engine.calls == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_completion_invalid_parameters(client: TestClient, body: dict, param: str) -> None:
    assert_error(client.post("/v1/completions", json=body), 400, param=param)


def test_lone_surrogate_escapes_are_refused(client: TestClient, engine: FakeEngine) -> None:
    # Valid JSON, but no tokenizer (nor msgpack) can encode the string it decodes to.
    r = client.post(
        "/v1/completions", content=b'{"prompt": "a\\ud800"}', headers={"content-type": "application/json"}
    )
    assert_error(r, 400, param="prompt")
    r = client.post("/v1/chat/completions", content=json.dumps(chat_body(stop="\ud800")).encode())
    assert_error(r, 400, param="stop")
    assert engine.calls == []


def test_echo_is_refused_by_name(client: TestClient) -> None:
    error = assert_error(
        client.post("/v1/completions", json={"prompt": "x", "echo": True}), 400, param="echo"
    )
    assert "not supported" in error["message"]


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"messages": [', {"content-type": "application/json"}),
        (b"not json at all", {"content-type": "application/json"}),
        (b"\xff\xfe\xfa", {"content-type": "application/json"}),
        (b"[1, 2]", {"content-type": "application/json"}),
        (b"", {"content-type": "application/json"}),
        (b"messages=x", {"content-type": "application/x-www-form-urlencoded"}),
    ],
)
def test_malformed_bodies(client: TestClient, content: bytes, headers: dict) -> None:
    assert_error(client.post("/v1/chat/completions", content=content, headers=headers), 400)


def test_json_without_content_type_is_accepted(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=json.dumps(chat_body("a")).encode())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "a"


def test_unknown_model(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**chat_body(), "model": "gpt-5"})
    assert_error(r, 404, param="model", code="model_not_found")
    assert_error(
        client.post("/v1/completions", json={"model": "x", "prompt": "a"}),
        404,
        param="model",
        code="model_not_found",
    )


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing"), 404)
    r = client.get("/v1/chat/completions")
    assert_error(r, 405)
    assert "POST" in r.headers["allow"]


def test_context_length_rejection(client: TestClient) -> None:
    error = assert_error(
        client.post("/v1/chat/completions", json=chat_body("x @@long")), 400, code="context_length_exceeded"
    )
    assert error["message"] == LONG_MESSAGE


def test_queue_full_is_503_with_retry_after(client: TestClient) -> None:
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": "x @@busy", "stream": stream})
        assert_error(r, 503)
        assert r.headers["retry-after"] == "1"


def test_rejection_of_one_prompt_in_a_batch_fails_the_request(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/completions", json={"prompt": ["fine words here", "@@long"], "stream": True})
    assert_error(r, 400, code="context_length_exceeded")


def test_engine_death_before_and_during_a_stream(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json=chat_body("a @@die b"))
    assert_error(r, 503)
    assert r.headers["retry-after"] == "1"
    # A stream has sent its 200 and first chunks: the error is its last event.
    events = sse_events(client.post("/v1/chat/completions", json=chat_body("a @@die b", stream=True)))
    assert events[-1]["error"]["type"] == "service_unavailable_error"
    assert [e["choices"][0]["delta"] for e in events[:-1]] == [
        {"role": "assistant", "content": ""},
        {"content": "a"},
    ]
    engine.healthy = False
    assert client.get("/health").status_code == 503


def test_api_key() -> None:
    app, engine = make_app(api_key=KEY)
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = c.post("/v1/chat/completions", json=chat_body(), headers=headers)
            assert_error(r, 401, code="invalid_api_key")
            assert_error(c.get("/v1/models", headers=headers), 401, code="invalid_api_key")
            assert_error(
                c.post("/generate", json={"text": "a"}, headers=headers), 401, code="invalid_api_key"
            )
        # Checked before the body: a malformed body without the key is still a 401.
        assert_error(c.post("/v1/completions", content=b"{", headers={}), 401, code="invalid_api_key")
        assert engine.calls == []
        good = {"Authorization": f"Bearer {KEY}"}
        assert c.post("/v1/chat/completions", json=chat_body(), headers=good).status_code == 200
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200
        assert c.get("/openapi.json").status_code == 200


# ---- the official openai client


@pytest.fixture
def openai_client(engine: FakeEngine) -> Iterator[openai.OpenAI]:
    app, _ = make_app(engine, api_key=KEY)
    with TestClient(app) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)


def test_openai_chat(openai_client: openai.OpenAI, engine: FakeEngine) -> None:
    completion = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "red green blue"}],
        n=2,
        seed=5,
        stop=["blue"],
        logprobs=True,
        top_logprobs=1,
    )
    assert [c.message.content for c in completion.choices] == ["red green", "red green"]
    assert [c.finish_reason for c in completion.choices] == ["stop", "stop"]
    assert completion.choices[0].logprobs.content[1].token == " green"
    assert completion.usage.prompt_tokens == 3 and completion.usage.completion_tokens == 6
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    assert sorted(call.sampling.seed for call in engine.calls) == [5, 6]
    assert all(call.sampling.stop == ["blue"] for call in engine.calls)


def test_openai_chat_stream(openai_client: openai.OpenAI) -> None:
    stream = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_openai_completions(openai_client: openai.OpenAI) -> None:
    completion = openai_client.completions.create(model=MODEL, prompt=["a b", "c"], max_tokens=1, logprobs=1)
    assert [c.text for c in completion.choices] == ["a", "c"]
    assert [c.finish_reason for c in completion.choices] == ["length", "stop"]
    assert completion.choices[0].logprobs.tokens == ["a"]
    text = "".join(
        c.choices[0].text for c in openai_client.completions.create(model=MODEL, prompt="x y", stream=True)
    )
    assert text == "x y"


def test_openai_models(openai_client: openai.OpenAI) -> None:
    assert [m.id for m in openai_client.models.list()] == [MODEL]


def test_openai_errors(openai_client: openai.OpenAI, engine: FakeEngine) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.chat.completions.create(model=MODEL, messages=messages, temperature=5000)
    assert bad.value.param == "temperature" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as long:
        openai_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "@@long"}])
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as missing:
        openai_client.chat.completions.create(model="other", messages=messages)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.InternalServerError) as busy:
        openai_client.completions.create(model=MODEL, prompt="@@busy")
    assert busy.value.status_code == 503
    wrong = openai.OpenAI(
        base_url="http://testserver/v1", api_key="nope", http_client=openai_client._client, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as auth:
        wrong.models.list()
    assert auth.value.code == "invalid_api_key"


# ---- client disconnects


async def call_asgi(
    app: FastAPI, path: str, body: dict, disconnect_when: Callable[[list[Message]], bool]
) -> list[Message]:
    """Run one request on the app; its client disconnects once `disconnect_when(sent messages)` holds."""
    sent: list[Message] = []
    changed = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        while not disconnect_when(sent):
            changed.clear()
            await changed.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        changed.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


async def wait_until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until `condition` holds (cancelled tasks finish in a few iterations)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


def test_stream_disconnect_aborts_engine_requests() -> None:
    app, engine = make_app()

    def after_first_content(sent: list[Message]) -> bool:
        return any(b'"content":"a"' in m.get("body", b"") for m in sent)

    async def scenario() -> list[Message]:
        sent = await call_asgi(
            app, "/v1/chat/completions", chat_body("a @@hang b", n=2, stream=True), after_first_content
        )
        await wait_until(lambda: len(engine.aborted) == 2)
        return sent

    sent = asyncio.run(scenario())
    assert sent[0]["status"] == 200
    assert sorted(engine.aborted) == [0, 1] and engine.num_in_flight == 0


def test_non_stream_disconnect_aborts_engine_requests() -> None:
    app, engine = make_app()

    async def scenario() -> list[Message]:
        # The client leaves once both requests are running (the fake hangs after its first token).
        sent = await call_asgi(
            app, "/v1/completions", {"prompt": "a @@hang b", "n": 2}, lambda _: engine.num_in_flight == 2
        )
        await wait_until(lambda: len(engine.aborted) == 2)
        return sent

    sent = asyncio.run(scenario())
    assert sent[0]["status"] == 499  # answered to no one: it shows in metrics only
    assert engine.num_in_flight == 0


def test_stream_disconnect_over_a_real_socket() -> None:
    """uvicorn, a real TCP connection: closing it mid-stream aborts the engine request."""
    app, engine = make_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            with http.stream("POST", "/v1/chat/completions", json=chat_body("a @@hang b", stream=True)) as r:
                lines = r.iter_lines()
                assert (
                    json.loads(next(lines).removeprefix("data: "))["choices"][0]["delta"]["role"]
                    == "assistant"
                )
            # Leaving the block closed the connection.
        while not engine.aborted:
            assert time.monotonic() < deadline, "the engine request was never aborted"
            time.sleep(0.01)
        assert engine.aborted == [0] and engine.num_in_flight == 0
    finally:
        server.should_exit = True
        thread.join(timeout=10)
