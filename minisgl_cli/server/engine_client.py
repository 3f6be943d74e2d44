"""EngineClient: the API process's handle on the engine processes (asyncio, ZMQ).

`generate()` sends a prompt to a tokenizer worker (round-robin by request id) and yields the request's
TextOutputs as the worker forwards them; one receive task reads the API's inbound socket and routes each
message to its request's queue. A request whose iterator is closed before its last output (a client that
went away) is aborted, which frees its KV pages in the scheduler. `tokenize()` and `detokenize()` ask a worker
the same way and await its one reply: the tokenizer never runs in this process's event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.engine.tokenize import ChatPrompt, Prompt
from minisgl_cli.server.messages import (
    AbortRequest,
    DetokenizeQuery,
    DetokenizeReply,
    EngineStats,
    GenerateRequest,
    Ready,
    Rejected,
    TextOutput,
    TokenizeQuery,
    TokenizeReply,
    pack,
    unpack,
)

log = logging.getLogger(__name__)


class RequestRejected(Exception):
    """The engine refused a request before running it (bad prompt, too long, queue full)."""

    def __init__(self, rejected: Rejected) -> None:
        super().__init__(rejected.message)
        self.status = rejected.status
        self.message = rejected.message
        self.param = rejected.param
        self.code = rejected.code


class EngineUnavailable(Exception):
    """An engine process died: nothing in flight can finish (HTTP 503)."""


# What a request's queue receives: its outputs (or a tokenizer's one reply), a rejection, or the engine's death.
_Item = TextOutput | TokenizeReply | DetokenizeReply | Rejected | EngineUnavailable


@dataclass(frozen=True)
class IpcAddresses:
    """The ZMQ endpoints of one server instance (ipc:// paths in a private temporary directory)."""

    api: str  # the API's inbound socket: outputs, rejections and stats
    scheduler: str  # the scheduler's inbound socket: tokenized requests and aborts
    tokenizers: tuple[str, ...]  # each tokenizer worker's inbound socket: requests, aborts, token outputs
    ready: str  # the launcher's: Ready / Failed from every process

    @classmethod
    def in_dir(cls, directory: str, num_tokenizers: int) -> IpcAddresses:
        return cls(
            api=f"ipc://{directory}/api",
            scheduler=f"ipc://{directory}/scheduler",
            tokenizers=tuple(f"ipc://{directory}/tokenizer-{i}" for i in range(num_tokenizers)),
            ready=f"ipc://{directory}/ready",
        )


class EngineClient:
    def __init__(self, addresses: IpcAddresses, info: Ready) -> None:
        self.info = info  # the scheduler's Ready: model name, context length, KV capacity
        self.stats: EngineStats | None = None  # the scheduler's latest
        self.healthy = True
        self._addresses = addresses
        self._queues: dict[int, asyncio.Queue[_Item]] = {}
        self._rids = itertools.count()
        self._ctx: zmq.asyncio.Context | None = None
        self._task: asyncio.Task[None] | None = None
        self._death: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    async def start(self) -> None:
        """Open the sockets and start routing; call from the event loop that serves requests."""
        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.asyncio.Context()
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.bind(self._addresses.api)
        self._outboxes = []
        for address in self._addresses.tokenizers:
            sock = self._ctx.socket(zmq.PUSH)
            sock.connect(address)
            self._outboxes.append(sock)
        self._task = asyncio.create_task(self._route())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)

    def mark_dead(self, reason: str) -> None:
        """An engine process died: fail every request in flight and every later one with EngineUnavailable.
        Safe to call from any thread (the launcher's watchdog calls it)."""
        self.healthy = False
        self._death = reason
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_all, reason)

    def _fail_all(self, reason: str) -> None:
        for queue in self._queues.values():
            queue.put_nowait(EngineUnavailable(reason))

    async def generate(
        self, prompt: Prompt, sampling: SamplingParams, *, max_tokens_explicit: bool = False
    ) -> AsyncIterator[TextOutput]:
        """Run one prompt; yield its outputs until the one with `finish_reason`.

        Raises RequestRejected (before the first output) or EngineUnavailable. Use it under
        `contextlib.aclosing` so that leaving early aborts the request at once.
        """
        if self._death is not None:
            raise EngineUnavailable(self._death)
        rid = next(self._rids)
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queues[rid] = queue
        outbox = self._outboxes[rid % len(self._outboxes)]
        done = False
        try:
            await outbox.send(pack(GenerateRequest(rid, _plain(prompt), sampling, max_tokens_explicit)))
            while True:
                item = await queue.get()
                if isinstance(item, Rejected):
                    done = True
                    raise RequestRejected(item)
                if isinstance(item, EngineUnavailable):
                    done = True
                    raise item
                assert isinstance(item, TextOutput)
                done = item.finish_reason is not None
                yield item
                if done:
                    return
        finally:
            del self._queues[rid]
            if not done and self.healthy:
                # Not awaited: this runs in cancellation too. A PUSH to a live peer sends without blocking.
                outbox.send(pack(AbortRequest(rid)))

    async def tokenize(
        self, prompt: str | ChatPrompt, *, add_special_tokens: bool = True, token_strs: bool = False
    ) -> TokenizeReply:
        """The prompt's token ids, as generation would see them. RequestRejected for a prompt the worker
        cannot tokenize (no tokenizer, a template that refuses the chat), or EngineUnavailable."""
        reply = await self._ask(
            lambda rid: TokenizeQuery(rid, _plain(prompt), add_special_tokens, token_strs)
        )
        assert isinstance(reply, TokenizeReply)
        return reply

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of `token_ids`; RequestRejected for ids outside the vocabulary or a model without a
        tokenizer, or EngineUnavailable."""
        reply = await self._ask(lambda rid: DetokenizeQuery(rid, [int(t) for t in token_ids]))
        assert isinstance(reply, DetokenizeReply)
        return reply.text

    async def _ask(self, query: Callable[[int], Any]) -> _Item:
        """Send `query(rid)` to the rid's tokenizer worker and wait for its one answer. Nothing runs in the
        engine, so a caller that goes away leaves nothing to abort: a late answer is dropped."""
        if self._death is not None:
            raise EngineUnavailable(self._death)
        rid = next(self._rids)
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queues[rid] = queue
        try:
            await self._outboxes[rid % len(self._outboxes)].send(pack(query(rid)))
            item = await queue.get()
        finally:
            del self._queues[rid]
        if isinstance(item, Rejected):
            raise RequestRejected(item)
        if isinstance(item, EngineUnavailable):
            raise item
        return item

    async def _route(self) -> None:
        while True:
            data = await self._inbox.recv()
            message = unpack(data)
            for item in message if isinstance(message, list) else [message]:
                if isinstance(item, EngineStats):
                    self.stats = item
                    continue
                queue = self._queues.get(item.rid)
                if queue is not None:  # else: the request was aborted; late outputs are dropped
                    queue.put_nowait(item)


def _plain(prompt: Prompt) -> str | list[int] | list[dict[str, object]] | ChatPrompt:
    """The prompt as msgpack-able builtins (chat messages may arrive as pydantic-made mappings)."""
    if isinstance(prompt, (str, ChatPrompt)):
        return prompt
    items = list(prompt)
    if items and isinstance(items[0], int):
        return list(map(int, items))  # type: ignore[arg-type]
    return [dict(m) for m in items]  # type: ignore[arg-type]
