"""What keeps one huge request from stalling the others (issue 18): the body limit (a 413 before the body is
parsed, or read past the limit), prompts far over the context refused from a bounded prefix of their text,
large bodies parsed off the event loop, and tokenization on threads of the tokenizer worker, whose loop
meanwhile forwards the other requests' outputs and drops the result of a request aborted while it was being
tokenized.

References: hand-counted byte limits, the embedded SmolLM2's tokenizer (what the prefix may cost), a gated
fake tokenizer (what the worker's loop does while a prompt is being tokenized), and a real `minisgl serve`
on a dummy-weights shape with a 256-token context. The assertions are on outcomes and order, never timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq
from api_fakes import FakeEngine, chat_body, make_app
from fastapi.testclient import TestClient
from server_helpers import ServerProcess, running_server

from minisgl_cli.config import load_config
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.engine.tokenize import ChatPrompt
from minisgl_cli.errors import UsageError
from minisgl_cli.server import child, tokenizer_worker
from minisgl_cli.server.api import ApiSettings
from minisgl_cli.server.engine_client import IpcAddresses
from minisgl_cli.server.long_prompts import CHARS_PER_TOKEN, PromptTooLong, check_length
from minisgl_cli.server.messages import (
    AbortRequest,
    GenerateRequest,
    Rejected,
    TextOutput,
    TokenizedRequest,
    TokenOutput,
    pack,
    unpack,
)
from minisgl_cli.server.tokenizer_worker import TokenizerWorker, prepare

Message = dict[str, Any]  # an ASGI message
LIMIT = 50_000


def assert_413(response: Any) -> dict[str, Any]:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    return error


# ---- the body limit, in the API (fake engine)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    app, _ = make_app(engine, max_request_bytes=LIMIT)
    with TestClient(app) as c:
        yield c


def test_a_body_over_the_limit_is_a_413_naming_the_limit_and_the_flag(
    client: TestClient, engine: FakeEngine
) -> None:
    body = json.dumps(chat_body("word " * (LIMIT // 5))).encode()
    size = len(body)
    error = assert_413(client.post("/v1/chat/completions", content=body))
    assert f"{size:,} bytes" in error["message"]  # what its Content-Length said
    assert f"{LIMIT:,} bytes" in error["message"] and "--max-request-bytes" in error["message"]
    for path in ("/v1/completions", "/generate", "/tokenize", "/detokenize", "/nope"):
        assert_413(
            client.post(path, content=b" " * (LIMIT + 1), headers={"content-type": "application/json"})
        )
    assert engine.calls == []


def test_a_chunked_body_over_the_limit_is_a_413(client: TestClient, engine: FakeEngine) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the body is sent chunked
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * (LIMIT // 8)
        yield b'"}'

    error = assert_413(client.post("/v1/completions", content=chunks()))
    assert f"{LIMIT:,} bytes" in error["message"] and "--max-request-bytes" in error["message"]
    assert engine.calls == []


def test_a_body_within_the_limit_reaches_the_engine_whole(client: TestClient, engine: FakeEngine) -> None:
    words = ["w"] * (LIMIT // 3)

    def chunks() -> Iterator[bytes]:
        text = json.dumps({"prompt": " ".join(words), "max_tokens": 2}).encode()
        for start in range(0, len(text), 1000):
            yield text[start : start + 1000]

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert engine.calls[-1].prompt.split() == words


async def _call(app: Any, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, int]:
    """One raw ASGI POST: (response status, body bytes the app took from `receive`)."""
    pending = list(chunks)
    taken = 0
    status = 0

    async def receive() -> Message:
        nonlocal taken
        if not pending:
            await asyncio.Event().wait()  # the client stays connected
        chunk = pending.pop(0)
        taken += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    await app(scope, receive, send)
    return status, taken


def test_a_declared_length_over_the_limit_is_refused_before_any_of_the_body_is_read() -> None:
    app, _ = make_app(max_request_bytes=LIMIT)
    status, taken = asyncio.run(_call(app, [(b"content-length", b"1000000000")], [b"{}"] * 3))
    assert (status, taken) == (413, 0)


def test_a_chunked_body_is_read_no_further_than_the_limit() -> None:
    app, _ = make_app(max_request_bytes=LIMIT)
    chunk = LIMIT // 10
    status, taken = asyncio.run(_call(app, [], [b"x" * chunk] * 1000))  # 100 times the limit
    assert status == 413
    assert taken <= LIMIT + chunk  # the chunk that passed the limit, and nothing after it


def test_the_api_key_is_checked_before_the_body_size() -> None:
    app, _ = make_app(api_key="sk-k", max_request_bytes=LIMIT)
    with TestClient(app) as c:
        r = c.post(
            "/v1/completions", content=b" " * (LIMIT + 1), headers={"content-type": "application/json"}
        )
        assert r.status_code == 401
        r = c.post(
            "/v1/completions",
            content=b" " * (LIMIT + 1),
            headers={"content-type": "application/json", "authorization": "Bearer sk-k"},
        )
        assert_413(r)


def test_the_limit_is_a_server_setting_of_8_mib_by_default() -> None:
    assert load_config(environ={}).config.server.max_request_bytes == 8 * 1024 * 1024
    assert ApiSettings(served_model_name="m").max_request_bytes == 8 * 1024 * 1024
    loaded = load_config(environ={}, flags={"max_request_bytes": 1000})
    assert loaded.config.server.max_request_bytes == 1000
    assert loaded.sources["max_request_bytes"] == "flag --max-request-bytes"
    assert load_config(environ={"MINISGL_MAX_REQUEST_BYTES": "2048"}).config.server.max_request_bytes == 2048
    with pytest.raises(UsageError):
        load_config(environ={}, flags={"max_request_bytes": 0})


# ---- large bodies are parsed off the event loop, with the same results as small ones


@pytest.fixture
def roomy_client(engine: FakeEngine) -> Iterator[TestClient]:
    app, _ = make_app(engine)  # the default limit
    with TestClient(app) as c:
        yield c


def test_large_bodies_parse_and_fail_as_small_ones_do(roomy_client: TestClient, engine: FakeEngine) -> None:
    client = roomy_client
    ids = list(range(20_000))  # over body_route's threshold
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 3})
    assert r.status_code == 200 and engine.calls[-1].prompt == ids
    r = client.post("/v1/completions", json={"prompt": [*ids, "x"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/completions", json={"prompt": ids, "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
    truncated = json.dumps({"prompt": ids})[:-2].encode()
    r = client.post("/v1/completions", content=truncated, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("malformed JSON body")
    r = client.post("/v1/chat/completions", json=chat_body("w " * 50_000, max_tokens=2))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "w w"


# ---- prompts far over the context: refused from a bounded prefix


class CountingTokenizer:
    """A real tokenizer that records the length of every text it is asked to encode."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.chat_template = tokenizer.chat_template
        self.encoded: list[int] = []

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        self.encoded.append(len(text))
        return self._tokenizer.encode(text, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer.apply_chat_template(*args, **kwargs)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # it warns about every text longer than the model's context
    return AutoTokenizer.from_pretrained(smollm2_dir)


CONTEXT = 512
BOUND = (CONTEXT + 1) * CHARS_PER_TOKEN  # the most characters the length check may tokenize


def _request(prompt: Any, rid: int = 7) -> GenerateRequest:
    return GenerateRequest(rid, prompt, SamplingParams(max_tokens=8))


def test_an_over_long_text_prompt_is_refused_from_a_bounded_prefix(smollm2_tokenizer: Any) -> None:
    tok = CountingTokenizer(smollm2_tokenizer)
    prompt = "The quick brown fox jumps over the lazy dog. " * 20_000  # 900K characters
    result = prepare(_request(prompt), tok, 49152, CONTEXT)
    assert isinstance(result, Rejected)
    assert (result.status, result.param, result.code) == (400, "prompt", "context_length_exceeded")
    assert result.message.startswith("the prompt has at least ")
    assert f"the context length is {CONTEXT}" in result.message
    assert tok.encoded and max(tok.encoded) <= BOUND  # never the whole prompt
    # "at least N" holds: N is no more than the tokens of a part of the prompt.
    at_least = int(result.message.removeprefix("the prompt has at least ").split()[0])
    assert CONTEXT <= at_least <= len(smollm2_tokenizer.encode(prompt[: 2 * BOUND]))


def test_over_long_chats_and_token_ids_are_refused_without_tokenizing_them_whole(
    smollm2_tokenizer: Any,
) -> None:
    tok = CountingTokenizer(smollm2_tokenizer)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there " * 50_000}]
    for prompt in (chat, ChatPrompt(chat, None, {})):
        result = prepare(_request(prompt), tok, 49152, CONTEXT)
        assert isinstance(result, Rejected) and result.param == "messages"
        assert result.code == "context_length_exceeded" and "at least" in result.message
    assert max(tok.encoded) <= BOUND
    tok.encoded.clear()
    result = prepare(_request(list(range(CONTEXT))), tok, 49152, CONTEXT)
    assert (
        isinstance(result, Rejected) and result.param == "prompt" and result.code == "context_length_exceeded"
    )
    assert result.message.startswith(f"the prompt has {CONTEXT} tokens and the context length is {CONTEXT}")
    assert tok.encoded == []  # token ids are counted, not tokenized


def test_prompts_that_fit_are_tokenized_once_and_whole(smollm2_tokenizer: Any) -> None:
    tok = CountingTokenizer(smollm2_tokenizer)
    prompt = "Count from one to ten: 1, 2, 3,"
    result = prepare(_request(prompt), tok, 49152, CONTEXT)
    assert isinstance(result, TokenizedRequest) and result.input_ids == smollm2_tokenizer.encode(prompt)
    assert tok.encoded == [len(prompt)]  # no length check for a prompt within the prefix bound
    ids = list(range(CONTEXT - 1))
    result = prepare(_request(ids), tok, 49152, CONTEXT)
    assert isinstance(result, TokenizedRequest) and result.input_ids == ids


def test_text_of_long_tokens_is_not_refused_from_its_prefix(smollm2_tokenizer: Any) -> None:
    # Runs of spaces are a few tokens per hundred characters: over the prefix bound in characters, yet within
    # the context in tokens. The prefix cannot tell, so it must not refuse.
    prompt = "a" + " " * (3 * BOUND) + "b"
    assert len(smollm2_tokenizer.encode(prompt)) < CONTEXT
    check_length(prompt, smollm2_tokenizer, CONTEXT)  # no PromptTooLong
    with pytest.raises(PromptTooLong):
        check_length("word " * BOUND, smollm2_tokenizer, CONTEXT)


# ---- the worker's loop while a prompt is being tokenized


class GatedTokenizer:
    """One id per word (its length); encoding a text that starts with "SLOW" waits until `gate` is set."""

    chat_template = None

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.slow_started = threading.Event()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if text.startswith("SLOW"):
            self.slow_started.set()
            assert self.gate.wait(60)
        return [len(word) for word in text.split()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" w{i}" for i in ids)


class Harness:
    """A TokenizerWorker running on a thread, with the sockets of the API and the scheduler around it."""

    def __init__(self, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(tokenizer_worker, "TOKENIZE_THREADS", threads)
        self.dir = tempfile.mkdtemp(prefix="m18-")  # ipc:// paths must stay short
        addresses = IpcAddresses.in_dir(self.dir, 1)
        ctx = zmq.Context.instance()
        self.scheduler = ctx.socket(zmq.PULL)
        self.scheduler.bind(addresses.scheduler)
        self.api = ctx.socket(zmq.PULL)
        self.api.bind(addresses.api)
        self.tokenizer = GatedTokenizer()
        worker = TokenizerWorker(0, self.tokenizer, 1000, addresses, context_length=64)
        self.inbox = ctx.socket(zmq.PUSH)
        self.inbox.connect(addresses.tokenizers[0])
        self.thread = threading.Thread(target=worker.run, args=(os.getppid(),), daemon=True)
        self.thread.start()

    def send(self, message: Any) -> None:
        self.inbox.send(pack(message))

    def from_scheduler_side(self) -> Any:
        assert self.scheduler.poll(30_000), "nothing reached the scheduler"
        return unpack(self.scheduler.recv())

    def from_api_side(self) -> Any:
        assert self.api.poll(30_000), "nothing reached the API"
        return unpack(self.api.recv())

    def close(self) -> None:
        child._stop_requested.set()  # what SIGTERM sets in a worker process
        self.tokenizer.gate.set()
        self.thread.join(10)
        child._stop_requested.clear()
        for sock in (self.scheduler, self.api, self.inbox):
            sock.close(linger=0)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    harness = Harness(1, monkeypatch)
    yield harness
    harness.close()


@pytest.fixture
def two_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    harness = Harness(2, monkeypatch)
    yield harness
    harness.close()


def test_outputs_flow_while_a_prompt_is_tokenized_and_an_abort_drops_its_result(one_thread: Harness) -> None:
    h = one_thread
    h.send(_request("a bb ccc", rid=1))
    assert h.from_scheduler_side() == TokenizedRequest(1, [1, 2, 3], SamplingParams(max_tokens=8))
    h.send(_request("SLOW x", rid=0))
    assert h.tokenizer.slow_started.wait(30)
    # The only tokenizing thread is stuck on request 0; request 1's outputs still go through, in order.
    h.send([TokenOutput(1, [5], None, None, 3, 0)])
    (first,) = h.from_api_side()
    # Aborted while it is being tokenized (the loop has read the abort once the output sent after it is
    # through): its result, when it comes, is dropped, and nothing reaches the scheduler for it, not even the
    # abort; request 2, tokenized after it on the same thread, goes on.
    h.send(AbortRequest(0))
    h.send([TokenOutput(1, [6, 7], None, "length", 3, 0)])
    (last,) = h.from_api_side()
    assert isinstance(first, TextOutput) and isinstance(last, TextOutput)
    assert (first.text, last.text, last.finish_reason, last.completion_tokens) == (
        " w5",
        " w6 w7",
        "length",
        3,
    )
    assert not h.tokenizer.gate.is_set()
    h.send(_request("dd", rid=2))
    h.tokenizer.gate.set()
    assert h.from_scheduler_side() == TokenizedRequest(2, [2], SamplingParams(max_tokens=8))
    assert not h.api.poll(300)  # no rejection or output for request 0 either


def test_a_short_prompt_is_not_queued_behind_a_long_one(two_threads: Harness) -> None:
    h = two_threads
    h.send(_request("SLOW x", rid=0))
    assert h.tokenizer.slow_started.wait(30)
    h.send(_request("a b", rid=1))
    assert h.from_scheduler_side() == TokenizedRequest(1, [1, 1], SamplingParams(max_tokens=8))
    h.tokenizer.gate.set()
    assert h.from_scheduler_side() == TokenizedRequest(0, [4, 1], SamplingParams(max_tokens=8))
    h.send(_request("", rid=3))  # a rejection comes back to the API, as before
    rejected = h.from_api_side()
    assert isinstance(rejected, Rejected) and rejected.rid == 3 and rejected.status == 400


# ---- end to end: a real server with a small context and a 1 MB limit


SERVER_LIMIT = 1_000_000
SERVER_CONTEXT = 256


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server(
        "--dummy-weights", "-m", "smollm2-135m", "--device", "cpu", "--kv-cache-tokens", "2048",
        "--max-running-requests", "4", "--context-length", str(SERVER_CONTEXT),
        "--max-request-bytes", str(SERVER_LIMIT),
    ) as srv:  # fmt: skip
        yield srv


def test_the_flag_sets_the_servers_limit(server: ServerProcess) -> None:
    body = {"prompt": "x" * (SERVER_LIMIT + 10), "max_tokens": 1}  # under the default limit, over this one
    error = assert_413(httpx.post(f"{server.url}/v1/completions", json=body, timeout=60))
    assert f"{SERVER_LIMIT:,} bytes" in error["message"]

    def chunks() -> Iterator[bytes]:
        for _ in range(30):
            yield b"x" * 100_000

    assert_413(httpx.post(f"{server.url}/generate", content=chunks(), timeout=60))
    # A Content-Length over the limit is answered without a byte of the body sent.
    host, port = httpx.URL(server.url).host, httpx.URL(server.url).port
    with socket.create_connection((host, port), timeout=30) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 999999999\r\n\r\n"
        )
        answer = b""
        while chunk := conn.recv(65536):  # until the server closes the connection (Connection: close)
            answer += chunk
    head, _, body = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413") and "connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_an_over_long_prompt_is_refused_by_the_server(server: ServerProcess) -> None:
    body = {"prompt": "word " * 150_000, "max_tokens": 1}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
    assert error["message"].startswith("the prompt has at least ")


def test_a_small_request_completes_while_a_huge_one_is_still_in_flight(server: ServerProcess) -> None:
    order: list[str] = []
    huge_started = asyncio.Event()
    small_done = asyncio.Event()

    async def huge_body() -> Any:
        yield b'{"max_tokens": 1, "prompt": "'
        huge_started.set()
        with contextlib.suppress(TimeoutError):  # then the order below tells what went wrong
            await asyncio.wait_for(small_done.wait(), 120)
        for _ in range(9):
            yield b"word " * 20_000  # 900 KB in all: within the limit, far over the context
        yield b'"}'

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=180) as http:

            async def huge() -> httpx.Response:
                r = await http.post(
                    f"{server.url}/v1/completions",
                    content=huge_body(),
                    headers={"content-type": "application/json"},
                )
                order.append("huge")
                return r

            async def small() -> httpx.Response:
                await huge_started.wait()
                body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True}
                r = await http.post(f"{server.url}/v1/chat/completions", json=body)
                order.append("small")
                small_done.set()
                return r

            return await asyncio.gather(huge(), small())

    huge_response, small_response = asyncio.run(run())
    assert order == ["small", "huge"]
    assert small_response.status_code == 200 and small_response.json()["usage"]["completion_tokens"] == 3
    assert huge_response.status_code == 400
    assert huge_response.json()["error"]["code"] == "context_length_exceeded"
