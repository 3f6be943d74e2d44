"""The response formats: how each endpoint shapes a whole response and a stream's chunks.

Format is one endpoint's shape (ChatFormat and CompletionFormat are OpenAI's, NativeFormat is /generate's),
chat_logprobs and completion_logprobs shape logprobs both ways OpenAI does, and event_stream / EventStream
send a request's outputs as server-sent events: `data: {...}` chunks, then `data: [DONE]`. An error after
the stream's headers went out can only be its last event, `data: {"error": {...}}`.
"""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from minisgl_cli.server import protocol as p
from minisgl_cli.server.chat_output import ChatOutput, ChatOutputRules
from minisgl_cli.server.fanout import Choice, Fanout, usage_of
from minisgl_cli.server.http_errors import as_api_error
from minisgl_cli.server.messages import TextOutput, TokenLogprobs

_SSE_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer a stream


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


class Format(ABC):
    """How one endpoint shapes a response and a stream's chunks."""

    include_usage = False

    def encode(self, chunk: BaseModel) -> bytes:
        # OpenAI sends "usage" in chunks only when asked (null until the last one).
        return _sse(chunk.model_dump_json(exclude=None if self.include_usage else {"usage"}))

    @abstractmethod
    def chunks(self, choice: Choice, out: TextOutput) -> Iterable[BaseModel]:
        """A stream's chunks for `out`, the newest output of `choice` (not yet added to it)."""

    def usage_chunk(self, usage: p.Usage) -> BaseModel:
        raise NotImplementedError

    @abstractmethod
    def response(self, choices: list[Choice], usage: p.Usage) -> BaseModel:
        """The whole response, once every choice has finished."""


class _OpenAIFormat(Format):
    id_prefix = ""

    def __init__(self, model: str, *, logprobs: bool, include_usage: bool) -> None:
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.logprobs = logprobs
        self.include_usage = include_usage


def _top_logprobs(token: TokenLogprobs) -> list[p.TopLogprob]:
    return [p.TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in token.top_logprobs]


def chat_logprobs(tokens: Sequence[TokenLogprobs]) -> p.ChatLogprobs:
    return p.ChatLogprobs(
        content=[
            p.ChatTokenLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes, top_logprobs=_top_logprobs(t))
            for t in tokens
        ]
    )


def completion_logprobs(tokens: Sequence[TokenLogprobs], start: int) -> p.CompletionLogprobs:
    """The legacy shape; text offsets count from `start`, the choice's text length before these tokens."""
    offsets = []
    for t in tokens:
        offsets.append(start)
        start += len(t.token)
    return p.CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[{top.token: top.logprob for top in t.top_logprobs} for t in tokens],
        text_offset=offsets,
    )


class ChatFormat(_OpenAIFormat):
    """Chat completions; each choice's text read by `rules` into answer, reasoning and tool calls."""

    id_prefix = "chatcmpl-"

    def __init__(
        self, model: str, *, logprobs: bool, include_usage: bool, rules: ChatOutputRules | None = None
    ) -> None:
        super().__init__(model, logprobs=logprobs, include_usage=include_usage)
        self.rules = rules or ChatOutputRules()
        self._outputs: dict[int, ChatOutput] = {}  # a stream's choices, as their text arrives

    def _chunk(self, index: int, delta: dict[str, Any], **fields: Any) -> p.ChatCompletionChunk:
        choice = p.ChatChunkChoice(index=index, delta=delta, **fields)
        return p.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def chunks(self, choice: Choice, out: TextOutput) -> Iterable[BaseModel]:
        output = self._outputs.setdefault(choice.index, ChatOutput(self.rules))
        if choice.num_outputs == 0:
            yield self._chunk(choice.index, {"role": "assistant", "content": ""})
        deltas = output.feed(out.text) if out.text else []
        if out.logprobs and self.logprobs:
            # Logprobs ride on the piece's first delta (or an empty one when the text is held back).
            first = deltas.pop(0) if deltas else {"content": ""}
            yield self._chunk(choice.index, first, logprobs=chat_logprobs(out.logprobs))
        for delta in deltas:
            yield self._chunk(choice.index, delta)
        if out.finish_reason is not None:
            last, finish_reason = output.finish(out.finish_reason)
            for delta in last:
                yield self._chunk(choice.index, delta)
            yield self._chunk(choice.index, {}, finish_reason=finish_reason)

    def usage_chunk(self, usage: p.Usage) -> BaseModel:
        return p.ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def response(self, choices: list[Choice], usage: p.Usage) -> BaseModel:
        return p.ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[self._choice(c) for c in choices],
            usage=usage,
        )

    def _choice(self, choice: Choice) -> p.ChatChoice:
        output = ChatOutput(self.rules)
        output.feed(choice.text)
        _, finish_reason = output.finish(choice.finish_reason)
        message = output.message()
        calls = [
            p.ToolCallOut(id=c.id, function=p.FunctionCallOut(name=c.name, arguments=c.arguments))
            for c in message.tool_calls
        ]
        return p.ChatChoice(
            index=choice.index,
            message=p.AssistantMessage(
                content=message.content, reasoning_content=message.reasoning_content, tool_calls=calls or None
            ),
            logprobs=chat_logprobs(choice.logprobs) if self.logprobs else None,
            finish_reason=finish_reason,
        )


class CompletionFormat(_OpenAIFormat):
    id_prefix = "cmpl-"

    def _chunk(self, choice: p.CompletionChoice) -> p.CompletionResponse:
        return p.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice])

    def chunks(self, choice: Choice, out: TextOutput) -> Iterable[BaseModel]:
        if out.text or out.logprobs:
            logprobs = (
                completion_logprobs(out.logprobs, choice.logprob_chars)
                if self.logprobs and out.logprobs
                else None
            )
            yield self._chunk(
                p.CompletionChoice(index=choice.index, text=out.text, logprobs=logprobs, finish_reason=None)
            )
        if out.finish_reason is not None:
            yield self._chunk(
                p.CompletionChoice(index=choice.index, text="", finish_reason=out.finish_reason)
            )

    def usage_chunk(self, usage: p.Usage) -> BaseModel:
        return p.CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def response(self, choices: list[Choice], usage: p.Usage) -> BaseModel:
        return p.CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                p.CompletionChoice(
                    index=c.index,
                    text=c.text,
                    logprobs=completion_logprobs(c.logprobs, 0) if self.logprobs else None,
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ],
            usage=usage,
        )


class NativeFormat(Format):
    @staticmethod
    def _body(text: str, ids: list[int], meta: Choice | TextOutput) -> p.NativeGenerateResponse:
        info = p.NativeMetaInfo(
            prompt_tokens=meta.prompt_tokens,
            completion_tokens=meta.completion_tokens,
            cached_tokens=meta.cached_tokens,
            finish_reason=meta.finish_reason,
        )
        return p.NativeGenerateResponse(text=text, output_ids=ids, meta_info=info)

    def chunks(self, choice: Choice, out: TextOutput) -> Iterable[BaseModel]:
        if out.text or out.token_ids or out.finish_reason is not None:
            yield self._body(out.text, out.token_ids, out)

    def response(self, choices: list[Choice], usage: p.Usage) -> BaseModel:
        (choice,) = choices
        return self._body(choice.text, choice.token_ids, choice)


async def event_stream(fanout: Fanout, fmt: Format, choices: list[Choice], n: int) -> AsyncIterator[bytes]:
    try:
        async for index, out in fanout.events():
            for chunk in fmt.chunks(choices[index], out):
                yield fmt.encode(chunk)
            choices[index].add(out)
        if fmt.include_usage:
            yield fmt.encode(fmt.usage_chunk(usage_of(choices, n)))
    except Exception as exc:
        # The 200 and its headers are gone: the error can only be the stream's last event.
        yield _sse(json.dumps(as_api_error(exc).body()))
    finally:
        fanout.close()
    yield _SSE_DONE


class EventStream(StreamingResponse):
    """An SSE response that closes its fanout however the response ends. Starlette cancels a stream whose
    client left, but a generator suspended at a yield (or never started) is not closed by that."""

    def __init__(self, fanout: Fanout, events: AsyncIterator[bytes]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._fanout = fanout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._fanout.close()
