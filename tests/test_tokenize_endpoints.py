"""/tokenize, /detokenize (vLLM's shapes, also under /v1/) and /version.

References: the embedded SmolLM2's own transformers tokenizer (the ids of a text, of a chat rendered by
its template, the text of ids), and a chat completion's prompt_tokens for the same messages, through a
real `minisgl serve`; the worker's answers (tokenizer_worker.answer) with the placeholder tokenizer of a
dummy-weights shape and with none; and the API's field policy and API key over a fake engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_fakes import MODEL, FakeEngine, make_app
from fastapi.testclient import TestClient
from server_helpers import ServerProcess, running_server

from minisgl_cli import __version__
from minisgl_cli.engine.builder import load_tokenizer
from minisgl_cli.engine.tokenize import ChatPrompt
from minisgl_cli.model_source import resolve_model
from minisgl_cli.server.engine_client import RequestRejected
from minisgl_cli.server.messages import DetokenizeQuery, Rejected, TokenizeQuery, TokenizeReply
from minisgl_cli.server.tokenizer_worker import answer

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
TEXT = "Hello, wörld! Count from one to ten: 1, 2, 3,"


# ---- the API over a fake engine: field policy, what reaches the engine, the API key


class TokenizingEngine(FakeEngine):
    """FakeEngine with the tokenizer workers' two queries: a word's id is its length; an id reads back as
    "w<id>"; a prompt holding "@@bad" is rejected as a worker rejects one."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[tuple[Any, bool, bool]] = []

    async def tokenize(
        self, prompt: Any, *, add_special_tokens: bool = True, token_strs: bool = False
    ) -> TokenizeReply:
        self.queries.append((prompt, add_special_tokens, token_strs))
        text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt.messages)
        if "@@bad" in text:
            raise RequestRejected(Rejected(0, 400, "the chat template refused these messages", "messages"))
        ids = [len(word) for word in text.split()]
        return TokenizeReply(0, ids, [f"w{i}" for i in ids] if token_strs else None)

    async def detokenize(self, token_ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in token_ids)


@pytest.fixture
def engine() -> TokenizingEngine:
    return TokenizingEngine()


@pytest.fixture
def client(engine: TokenizingEngine) -> Iterator[TestClient]:
    app, _ = make_app(engine)  # type: ignore[arg-type]
    with TestClient(app) as c:
        yield c


def _error(response: Any, status: int, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    return error["message"]


def test_the_shapes_over_a_fake_engine(client: TestClient, engine: TokenizingEngine) -> None:
    for path in ("/tokenize", "/v1/tokenize"):
        r = client.post(path, json={"model": MODEL, "prompt": "ab cde", "return_token_strs": True})
        assert r.json() == {"count": 2, "max_model_len": 4096, "tokens": [2, 3], "token_strs": ["w2", "w3"]}
    assert engine.queries[-1] == ("ab cde", True, True)
    r = client.post("/tokenize", json={"prompt": "ab", "add_special_tokens": False})
    assert r.json()["token_strs"] is None and engine.queries[-1] == ("ab", False, False)
    for path in ("/detokenize", "/v1/detokenize"):
        assert client.post(path, json={"tokens": [2, 3]}).json() == {"prompt": "w2 w3"}
    assert client.get("/version").json() == {"version": __version__}


def test_messages_reach_the_worker_as_a_chat_completion_sends_them(
    client: TestClient, engine: TokenizingEngine
) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    kwargs = {"enable_thinking": False}
    body = {"messages": CHAT, "tools": tools, "chat_template_kwargs": kwargs}
    assert client.post("/tokenize", json=body).status_code == 200
    prompt, special, _ = engine.queries[-1]
    assert isinstance(prompt, ChatPrompt) and not special
    chat = {**body, "model": MODEL, "max_tokens": 1, "tool_choice": "required"}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert engine.calls[-1].prompt == prompt


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": CHAT, "add_generation_prompt": False}, "add_generation_prompt"),
        ({"messages": CHAT, "continue_final_message": True}, "continue_final_message"),
        ({"messages": CHAT, "chat_template": "{{ messages }}"}, "chat_template"),
        ({"messages": CHAT, "add_special_tokens": True}, "add_special_tokens"),
        ({"prompt": 5}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "@@bad"}]}, "messages"),
    ],
)
def test_tokenize_refuses_what_it_does_not_do_by_name(client: TestClient, body: dict, param: str) -> None:
    _error(client.post("/tokenize", json=body), 400, param)


def test_tokenize_takes_exactly_one_input(client: TestClient) -> None:
    assert "exactly one of 'prompt' and 'messages'" in _error(client.post("/tokenize", json={}), 400, None)
    both = {"prompt": "a", "messages": CHAT}
    assert "exactly one" in _error(client.post("/tokenize", json=both), 400, None)
    tools = {"prompt": "a", "chat_template_kwargs": {}}
    assert "go with 'messages'" in _error(client.post("/tokenize", json=tools), 400, None)
    # What asks for nothing is accepted; names unknown here are ignored, as elsewhere.
    ok = {"messages": CHAT, "add_generation_prompt": True, "continue_final_message": False, "mm_x": 1}
    assert client.post("/tokenize", json=ok).status_code == 200


def test_detokenize_and_the_model_field(client: TestClient) -> None:
    _error(client.post("/detokenize", json={"tokens": ["a"]}), 400, "tokens[0]")
    _error(client.post("/detokenize", json={"tokens": [2**64]}), 400, "tokens[0]")
    _error(client.post("/detokenize", json={}), 400, "tokens")
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}
    r = client.post("/tokenize", json={"model": "gpt-5", "prompt": "a"})
    assert _error(r, 404, "model") and r.json()["error"]["code"] == "model_not_found"
    _error(client.post("/detokenize", json={"model": "gpt-5", "tokens": [1]}), 404, "model")


def test_the_api_key_guards_tokenize_and_detokenize_not_version() -> None:
    app, _ = make_app(TokenizingEngine(), api_key="sk-k")  # type: ignore[arg-type]
    with TestClient(app) as c:
        for path, body in (("/tokenize", {"prompt": "a"}), ("/v1/detokenize", {"tokens": [1]})):
            assert c.post(path, json=body).status_code == 401
            assert c.post(path, json=body, headers={"Authorization": "Bearer sk-k"}).status_code == 200
        assert c.get("/version").status_code == 200


# ---- the worker's answers: the placeholder tokenizer of a dummy-weights shape, and no tokenizer


def test_a_dummy_shape_tokenizes_bytes_and_a_model_without_a_tokenizer_refuses() -> None:
    placeholder = load_tokenizer(resolve_model("smollm2-135m", dummy_weights=True))
    vocab = len(placeholder)
    reply = answer(TokenizeQuery(1, "hi é", add_special_tokens=True, token_strs=True), placeholder, vocab)
    assert isinstance(reply, TokenizeReply) and reply.token_ids == list("hi é".encode())
    assert reply.token_strs == placeholder.convert_ids_to_tokens(reply.token_ids)
    chat = answer(
        TokenizeQuery(2, ChatPrompt([{"role": "user", "content": "hi"}]), False), placeholder, vocab
    )
    assert isinstance(chat, TokenizeReply) and chat.token_ids == list(b"user: hi\nassistant:")
    text = answer(DetokenizeQuery(3, [*b"hi", 300]), placeholder, vocab)
    assert text.text == "hi t300"  # type: ignore[union-attr]
    bad = answer(DetokenizeQuery(4, [vocab]), placeholder, vocab)
    assert isinstance(bad, Rejected) and (bad.status, bad.param) == (400, "tokens")
    reserved = ChatPrompt([{"role": "user", "content": "hi"}], None, {"messages": []})
    refused = answer(TokenizeQuery(5, reserved, False), placeholder, vocab)
    assert isinstance(refused, Rejected) and (refused.status, refused.param) == (400, "messages")
    for query, param in (
        (TokenizeQuery(6, "hi"), "prompt"),
        (TokenizeQuery(7, ChatPrompt([{"role": "user", "content": "hi"}]), False), "messages"),
        (DetokenizeQuery(8, [1]), "tokens"),
    ):
        none = answer(query, None, vocab)
        assert isinstance(none, Rejected) and (none.rid, none.status, none.param) == (query.rid, 400, param)
        assert "no tokenizer" in none.message


# ---- end to end: a real server, against the model's own tokenizer


@pytest.fixture(scope="module")
def server(smollm2_dir: Path) -> Iterator[ServerProcess]:
    with running_server("--kv-cache-tokens", "4096", "--max-running-requests", "4") as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _post(server: ServerProcess, path: str, body: dict[str, Any]) -> Any:
    r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_tokenize_and_detokenize_round_trip_with_the_models_tokenizer(
    server: ServerProcess, tokenizer: Any
) -> None:
    ids = tokenizer.encode(TEXT)
    max_model_len = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["max_model_len"]
    for path in ("/tokenize", "/v1/tokenize"):
        got = _post(server, path, {"prompt": TEXT})
        assert got == {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": None}
    got = _post(server, "/tokenize", {"prompt": TEXT, "add_special_tokens": False, "return_token_strs": True})
    assert got["tokens"] == tokenizer.encode(TEXT, add_special_tokens=False)
    assert got["token_strs"] == tokenizer.convert_ids_to_tokens(got["tokens"])
    assert _post(server, "/detokenize", {"tokens": ids}) == {"prompt": tokenizer.decode(ids)}
    assert _post(server, "/v1/detokenize", {"tokens": ids})["prompt"] == TEXT
    assert _post(server, "/tokenize", {"prompt": ""})["tokens"] == tokenizer.encode("")


def test_messages_tokenize_as_the_chat_template_renders_them(server: ServerProcess, tokenizer: Any) -> None:
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    got = _post(server, "/tokenize", {"messages": CHAT})
    assert got["tokens"] == ids and got["count"] == len(ids)
    chat = _post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1})
    assert chat["usage"]["prompt_tokens"] == len(ids)  # what generation sees
    assert _post(server, "/detokenize", {"tokens": ids})["prompt"] == tokenizer.decode(ids)


def test_errors_and_version_on_the_server(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert "out of range" in r.json()["error"]["message"]
    r = httpx.post(
        f"{server.url}/tokenize", json={"messages": CHAT, "add_generation_prompt": False}, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "add_generation_prompt"
    assert httpx.get(f"{server.url}/version", timeout=10).json() == {"version": __version__}
