"""The client side of the OpenAI HTTP API that `chat --url` and `bench serve` share: the base URL a user types,
the API key header, GET /v1/models, and one readable line for every way a request can fail.

A client only: no torch, no engine. Library code: it raises MinisglError / UsageError and never prints.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from minisgl_cli.errors import MinisglError, UsageError

# The model list is one small answer: a server silent for this long is stuck or not there.
_LIST_TIMEOUT_S = 10.0
_API_KEY_STATUSES = (401, 403)
_MAX_QUOTED = 200  # characters of a non-OpenAI error body worth quoting in one line


def normalize_url(url: str) -> str:
    """The server's base URL, "scheme://host[:port][/prefix]", from what a user types: a trailing /v1 (how
    OpenAI clients write a base URL) or / is dropped. UsageError for anything but an http(s) URL with a host."""
    try:
        parsed: httpx.URL | None = httpx.URL(url.strip())
    except httpx.InvalidURL:  # a port that is no number, say
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise UsageError(f"--url {url!r}: expected http://HOST:PORT (optionally ending in /v1)")
    # A query or fragment would end up in the middle of every endpoint's path.
    base = str(parsed.copy_with(query=None, fragment=None))
    return base.rstrip("/").removesuffix("/v1")


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The bearer-token header for `api_key`; none without a key (an empty key counts as none)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def list_models(
    base_url: str, api_key: str | None = None, *, client: httpx.Client | None = None
) -> list[str]:
    """The model ids the server at `base_url` (see normalize_url) lists at GET /v1/models.

    `client` (its own headers, timeouts and transport) is used when given, else a short-lived one. A server
    that is unreachable, refuses the key, answers an error status or no OpenAI model list is a MinisglError
    with one line, so a wrong URL or key fails before anything is sent to it.
    """
    if client is None:
        with httpx.Client(timeout=_LIST_TIMEOUT_S) as own:
            return list_models(base_url, api_key, client=own)
    where = f"{base_url}/v1/models"
    with transport_errors(base_url):
        response = client.get(where, headers=auth_headers(api_key))
    if response.status_code in _API_KEY_STATUSES:
        raise MinisglError(f"GET {where} answered {http_error(response)}")
    if response.status_code != 200:
        raise MinisglError(
            f"GET {where} answered {http_error(response)} (is {base_url} an OpenAI-compatible server?)"
        )
    try:
        return [str(card["id"]) for card in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise MinisglError(
            f"GET {where} did not return an OpenAI model list (is {base_url} an OpenAI-compatible server?)"
        ) from None


@contextmanager
def transport_errors(base_url: str) -> Iterator[None]:
    """Turn httpx's failures inside the block into one MinisglError line naming the server."""
    try:
        yield
    except httpx.ConnectError as exc:
        raise MinisglError(f"cannot reach a server at {base_url} ({error_reason(exc)})") from None
    except httpx.TimeoutException:
        raise MinisglError(f"the server at {base_url} did not answer in time") from None
    except httpx.TransportError as exc:
        raise MinisglError(f"lost the connection to {base_url} ({error_reason(exc)})") from None
    except httpx.HTTPError as exc:  # a body that cannot be decoded, too many redirects
        raise MinisglError(f"the request to {base_url} failed ({error_reason(exc)})") from None


def error_reason(exc: BaseException) -> str:
    """Why an exception happened, for the end of a line: "Connection refused" of "[Errno 111] Connection
    refused"; the exception's type when it says nothing."""
    text = str(exc)
    return text.rsplit("] ", 1)[-1] if text else type(exc).__name__


def http_error(response: httpx.Response) -> str:
    """One line for a response with an error status, "HTTP 404: <the server's message>"; a refused key says
    what to check."""
    line = f"HTTP {response.status_code}: {error_message(response)}"
    return line + "; check --api-key" if response.status_code in _API_KEY_STATUSES else line


def error_message(response: httpx.Response) -> str:
    """The message of a (read) response's OpenAI-style error body, else the start of its text, else the
    status's reason phrase."""
    text = response.text
    try:
        body = response.json()
    except ValueError:
        return text.strip()[:_MAX_QUOTED] or response.reason_phrase
    return body_message(body, text) or response.reason_phrase


def body_message(body: Any, raw: str) -> str:
    """The message of an OpenAI-style error body, {"error": {"message": ...}} or {"error": "..."}, also the
    form an error takes as a streamed event; else the start of `raw`, the text `body` was parsed from."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]:
        return error["message"]
    if isinstance(error, str) and error:
        return error
    return raw.strip()[:_MAX_QUOTED]
