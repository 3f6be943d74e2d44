"""The shared OpenAI HTTP client pieces, against httpx.MockTransport servers: URL normalization, the key
header, GET /v1/models and the exact line each way of failing gives."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest

from minisgl_cli.errors import MinisglError, UsageError
from minisgl_cli.openai_http import (
    auth_headers,
    body_message,
    error_message,
    error_reason,
    http_error,
    list_models,
    normalize_url,
    transport_errors,
)

BASE = "http://h:1"
WHERE = f"GET {BASE}/v1/models"
NOT_OPENAI = f"(is {BASE} an OpenAI-compatible server?)"


@pytest.mark.parametrize(
    ("typed", "base"),
    [
        ("http://127.0.0.1:1919", "http://127.0.0.1:1919"),
        ("http://127.0.0.1:1919/", "http://127.0.0.1:1919"),
        ("http://127.0.0.1:1919/v1/", "http://127.0.0.1:1919"),
        ("  https://host/prefix/v1  ", "https://host/prefix"),
        ("HTTP://Host:8000/v1?x=1#top", "http://host:8000"),  # case folded, query and fragment dropped
        ("http://[::1]:8000/v1", "http://[::1]:8000"),
    ],
)
def test_normalize_url(typed: str, base: str) -> None:
    assert normalize_url(typed) == base


@pytest.mark.parametrize(
    "bad", ["127.0.0.1:1919", "localhost:1919", "ftp://host", "http://", "http://:80", "http://h:x", ""]
)
def test_normalize_url_refuses_what_is_no_http_url(bad: str) -> None:
    with pytest.raises(UsageError) as caught:
        normalize_url(bad)
    assert str(caught.value) == f"--url {bad!r}: expected http://HOST:PORT (optionally ending in /v1)"


def test_auth_headers() -> None:
    assert auth_headers("sk-1") == {"Authorization": "Bearer sk-1"}
    assert auth_headers(None) == auth_headers("") == {}


def client_for(handle: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handle))


def test_list_models_sends_the_key_and_returns_the_ids() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"object": "list", "data": [{"id": "a", "object": "model"}, {"id": 7}]}
        )

    assert list_models(BASE + "/prefix", "sk-1", client=client_for(handle)) == ["a", "7"]
    (request,) = seen
    assert (request.method, str(request.url)) == ("GET", BASE + "/prefix/v1/models")
    assert request.headers["authorization"] == "Bearer sk-1"
    assert list_models(BASE, client=client_for(handle)) == ["a", "7"]
    assert "authorization" not in seen[-1].headers


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (
            httpx.Response(401, json={"error": {"message": "bad key", "type": "auth"}}),
            f"{WHERE} answered HTTP 401: bad key; check --api-key",
        ),
        (
            httpx.Response(403, text="Forbidden here"),
            f"{WHERE} answered HTTP 403: Forbidden here; check --api-key",
        ),
        (httpx.Response(404, text=""), f"{WHERE} answered HTTP 404: Not Found {NOT_OPENAI}"),
        (
            httpx.Response(500, json={"error": "models are loading"}),
            f"{WHERE} answered HTTP 500: models are loading {NOT_OPENAI}",
        ),
        (
            httpx.Response(200, text="<html>hi</html>"),
            f"{WHERE} did not return an OpenAI model list {NOT_OPENAI}",
        ),
        (
            httpx.Response(200, json={"models": ["a"]}),
            f"{WHERE} did not return an OpenAI model list {NOT_OPENAI}",
        ),
        (
            httpx.Response(200, json={"data": ["a"]}),
            f"{WHERE} did not return an OpenAI model list {NOT_OPENAI}",
        ),
        (
            httpx.Response(200, json=[{"id": "a"}]),
            f"{WHERE} did not return an OpenAI model list {NOT_OPENAI}",
        ),
    ],
)
def test_list_models_errors_are_one_line(response: httpx.Response, message: str) -> None:
    with pytest.raises(MinisglError) as caught:
        list_models(BASE, client=client_for(lambda request: response))
    assert str(caught.value) == message


def failing(exc: type[httpx.HTTPError], text: str) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        raise exc(text, request=request) if issubclass(exc, httpx.RequestError) else exc(text)

    return handle


@pytest.mark.parametrize(
    ("exc", "text", "message"),
    [
        (
            httpx.ConnectError,
            "[Errno 111] Connection refused",
            f"cannot reach a server at {BASE} (Connection refused)",
        ),
        (httpx.ConnectTimeout, "timed out", f"the server at {BASE} did not answer in time"),
        (httpx.ReadTimeout, "", f"the server at {BASE} did not answer in time"),
        (
            httpx.RemoteProtocolError,
            "Server disconnected without sending a response.",
            f"lost the connection to {BASE} (Server disconnected without sending a response.)",
        ),
        (httpx.ReadError, "", f"lost the connection to {BASE} (ReadError)"),
        (
            httpx.TooManyRedirects,
            "Exceeded maximum allowed redirects.",
            f"the request to {BASE} failed (Exceeded maximum allowed redirects.)",
        ),
    ],
)
def test_transport_failures_are_one_line(exc: type[httpx.HTTPError], text: str, message: str) -> None:
    with pytest.raises(MinisglError) as caught:
        list_models(BASE, client=client_for(failing(exc, text)))
    assert str(caught.value) == message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chained traceback


def test_transport_errors_lets_other_exceptions_through() -> None:
    with pytest.raises(KeyError), transport_errors(BASE):
        raise KeyError("not an HTTP failure")


def test_list_models_without_a_client_reaches_the_network() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MinisglError) as caught:
        list_models(f"http://127.0.0.1:{port}")
    assert str(caught.value) == f"cannot reach a server at http://127.0.0.1:{port} (Connection refused)"


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(400, json={"error": {"message": "too long", "param": "messages"}}), "too long"),
        (httpx.Response(400, json={"error": "plain string error"}), "plain string error"),
        (
            httpx.Response(400, json={"error": {"message": ""}, "detail": "x"}),
            '{"error":{"message":""},"detail":"x"}',
        ),
        (httpx.Response(422, json={"detail": "bad"}), '{"detail":"bad"}'),
        (httpx.Response(502, text="  Bad Gateway\n"), "Bad Gateway"),
        (httpx.Response(502, text="x" * 500), "x" * 200),
        (httpx.Response(503, text=""), "Service Unavailable"),
        (httpx.Response(500, json=[1, 2]), "[1,2]"),
    ],
)
def test_error_message(response: httpx.Response, message: str) -> None:
    assert error_message(response) == message


def test_http_error_names_the_status_and_the_key_only_when_refused() -> None:
    assert http_error(httpx.Response(500, json={"error": {"message": "boom"}})) == "HTTP 500: boom"
    assert http_error(httpx.Response(401, text="no")) == "HTTP 401: no; check --api-key"
    assert http_error(httpx.Response(403, text="")) == "HTTP 403: Forbidden; check --api-key"


def test_body_message_of_a_streamed_error_event() -> None:
    raw = '{"error": {"message": "engine died", "code": 500}}'
    assert body_message({"error": {"message": "engine died", "code": 500}}, raw) == "engine died"
    assert body_message({"error": {"code": 500}}, raw) == raw
    assert body_message({"error": True}, " raw ") == "raw"
    assert body_message(["not", "a", "dict"], "y" * 300) == "y" * 200


def test_error_reason() -> None:
    assert error_reason(OSError(111, "Connection refused")) == "Connection refused"
    assert (
        error_reason(httpx.ConnectError("[Errno -2] Name or service not known"))
        == "Name or service not known"
    )
    assert error_reason(httpx.ReadTimeout("")) == "ReadTimeout"
    assert error_reason(ValueError("plain")) == "plain"


def test_imports_neither_torch_nor_the_engine() -> None:
    code = (
        "import sys, minisgl_cli.openai_http;"
        "assert not any(m == 'torch' or m.startswith('minisgl_cli.engine') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
