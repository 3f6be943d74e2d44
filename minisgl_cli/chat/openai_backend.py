"""The remote backend: any OpenAI-compatible server (ours or another), over httpx with streaming.

Chat requests go to POST /v1/chat/completions with `stream: true` and `stream_options.include_usage`, so the
server's own token count arrives as the last event. Every failure becomes one MinisglError line: the server
unreachable or gone, an HTTP error status (its OpenAI-style message quoted), an error event mid-stream.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import httpx

from minisgl_cli.chat.backend import Delta
from minisgl_cli.config import SamplingConfig
from minisgl_cli.errors import MinisglError
from minisgl_cli.openai_http import (
    auth_headers,
    body_message,
    http_error,
    list_models,
    normalize_url,
    transport_errors,
)

# Sent always: it bounds a chat answer's length (the server's default may be the whole context). The other
# settings only when the user chose them: the server then applies its own defaults (for a minisgl server,
# the model's generation_config.json) to the rest, and servers that refuse extensions (top_k, min_p,
# penalties, seed) never see them unasked.
_ALWAYS_SENT = frozenset({"max_tokens"})


class OpenAIBackend:
    def __init__(self, client: httpx.Client, url: str, model: str) -> None:
        self._client = client
        self.location = url
        self.model = model

    @classmethod
    def connect(
        cls,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> OpenAIBackend:
        """Check the server answers GET /v1/models and pick the model: `model` if it serves it, else its first.

        MinisglError if the server cannot be reached, refuses the key, or does not serve `model`.
        """
        base = normalize_url(url)
        # No read limit while streaming would hang on a stalled server; ten minutes is beyond any answer.
        timeout = httpx.Timeout(10.0, read=600.0)
        client = httpx.Client(
            base_url=base, headers=auth_headers(api_key), timeout=timeout, transport=transport
        )
        try:
            model = _pick_model(list_models(base, client=client), model, base)
        except BaseException:
            client.close()
            raise
        return cls(client, base, model)

    def stream(
        self,
        messages: list[dict[str, str]],
        settings: SamplingConfig,
        json_schema: dict[str, Any] | None = None,
        chosen: frozenset[str] = frozenset(),
    ) -> Iterator[Delta]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **_sampling_fields(settings, chosen),
        }
        if json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": json_schema},
            }
        tokens = 0
        with transport_errors(self.location):
            with self._client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise MinisglError(f"the server answered {http_error(response)}")
                for data in _sse_data(response.iter_lines()):
                    if data == "[DONE]":
                        return
                    chunk = _json_object(data)
                    if "error" in chunk:  # the stream had begun, so the error comes as an event
                        raise MinisglError(f"the server failed mid-answer: {body_message(chunk, data)}")
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        text = delta.get("content") or ""
                        thought = delta.get("reasoning_content") or ""
                        if text or thought:  # until the usage report, one text chunk stands for one token
                            tokens += 1
                        yield Delta(text, tokens, choice.get("finish_reason"), reasoning=thought)
                    usage = chunk.get("usage")
                    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                        tokens = usage["completion_tokens"]
                        yield Delta("", tokens)

    def close(self) -> None:
        self._client.close()


def _pick_model(served: list[str], model: str | None, base: str) -> str:
    if model is None:
        if not served:
            raise MinisglError(f"the server at {base} lists no models: name one with --model")
        return served[0]
    if served and model not in served:
        raise MinisglError(
            f"the server at {base} does not serve model '{model}' (it serves: {', '.join(served)})"
        )
    return model


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The payloads of a server-sent event stream's `data:` lines (comments and other fields skipped)."""
    for line in lines:
        if line.startswith("data:"):
            yield line[len("data:") :].strip()


def _json_object(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        chunk = None
    if not isinstance(chunk, dict):
        raise MinisglError(f"the server sent an event that is not a JSON object: {data[:100]}")
    return chunk


def _sampling_fields(settings: SamplingConfig, chosen: frozenset[str]) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(settings)]
    return {name: getattr(settings, name) for name in names if name in _ALWAYS_SENT or name in chosen}
