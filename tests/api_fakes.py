"""Test helpers for the HTTP API (server/api.py): a fake engine and an app over it. Shared by the API,
fuzzing and metrics tests.

FakeEngine keeps EngineClient's contract without processes or a model: it "generates" the words of its
prompt back, one token per output, so every expected text and count in those tests is worked out by hand
from the prompt.

    app, engine = make_app(api_key="sk-...")
    TestClient(app).post("/v1/chat/completions", json=chat_body("alpha beta"))
"""

from __future__ import annotations

import asyncio
import itertools
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from minisgl_cli.config import SamplingConfig
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.engine.tokenize import ChatPrompt
from minisgl_cli.server.api import ApiSettings, create_app
from minisgl_cli.server.engine_client import EngineUnavailable, RequestRejected
from minisgl_cli.server.messages import (
    EngineStats,
    GenerateRequest,
    Ready,
    Rejected,
    TextOutput,
    TokenizeReply,
    TokenLogprobs,
    TopLogprob,
    pack,
)

MODEL = "fake-model"
CONTEXT_LENGTH = 4096
# The server-wide defaults the tests' app runs with: a request that omits a field gets these.
DEFAULTS = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=64)
LONG_MESSAGE = "the prompt has 5000 tokens and the context length is 4096: it must be shorter"


@dataclass
class Call:
    prompt: Any
    sampling: SamplingParams
    max_tokens_explicit: bool


def prompt_words(prompt: Any) -> list[str]:
    if isinstance(prompt, ChatPrompt):
        prompt = prompt.messages
    if isinstance(prompt, str):
        return prompt.split()
    if prompt and isinstance(prompt[0], dict):
        return " ".join(m["content"] or "" for m in prompt).split()
    return [f"t{t}" for t in prompt]


def token_id(prompt: Any, k: int, word: str) -> int:
    # A token-id prompt is echoed id for id; a word gets a stable made-up id.
    if prompt and isinstance(prompt, list) and isinstance(prompt[0], int):
        return prompt[k]
    return zlib.crc32(word.encode()) % 50_000


def fake_logprob(k: int) -> float:
    return -(k + 1) / 8


class FakeEngine:
    """EngineClient's contract: echoes its prompt's words back, one token per output.

    It ends with "length" at max_tokens, else "stop" after the last word or at a word equal to a stop
    string (whose text is cut, as the real detokenizer cuts it). Trigger words in a prompt: "@@long"
    (rejected: 400, context length), "@@busy" (rejected: 503, queue full), "@@die" (EngineUnavailable
    after the first output), "@@hang" (waits forever after the first output).
    """

    def __init__(self, cached_tokens: int = 0, token_delay: float = 0.0) -> None:
        self.info = Ready(
            role="scheduler", model_name="fake", context_length=CONTEXT_LENGTH, max_seq_len=CONTEXT_LENGTH
        )
        self.healthy = True
        self.stats: EngineStats | None = EngineStats(
            num_running=3,
            num_waiting=2,
            kv_pages_used=25,
            kv_pages_total=100,
            page_size=1,
            prefix_hit_tokens=30,
            prefix_queried_tokens=120,
            num_preemptions=4,
        )
        self.cached_tokens = cached_tokens
        self.token_delay = token_delay  # seconds before each output: a stream outlives its handler
        self.calls: list[Call] = []
        self.aborted: list[int] = []  # rids whose iterator was closed before their last output
        self.starts = self.closes = 0
        self._live: set[int] = set()
        self._rids = itertools.count()

    @property
    def num_in_flight(self) -> int:
        return len(self._live)

    async def start(self) -> None:
        self.starts += 1

    async def close(self) -> None:
        self.closes += 1

    async def generate(
        self, prompt: Any, sampling: SamplingParams, *, max_tokens_explicit: bool = False
    ) -> AsyncIterator[TextOutput]:
        rid = next(self._rids)
        pack(GenerateRequest(rid, prompt, sampling, max_tokens_explicit))  # what the real client must send
        self.calls.append(Call(prompt, sampling, max_tokens_explicit))
        words = prompt_words(prompt)
        if "@@long" in words:
            raise RequestRejected(Rejected(rid, 400, LONG_MESSAGE))
        if "@@busy" in words:
            raise RequestRejected(Rejected(rid, 503, "the server has 1024 requests waiting: try again later"))
        if not words:
            raise RequestRejected(Rejected(rid, 400, "a prompt is empty: it must hold at least one token"))
        self._live.add(rid)
        finished = False
        try:
            for k, word in enumerate(words[: sampling.max_tokens]):
                await asyncio.sleep(self.token_delay)  # other requests interleave, as in a real engine
                if k == 1 and "@@die" in words:
                    raise EngineUnavailable("the scheduler process died")
                if k == 1 and "@@hang" in words:
                    await asyncio.Event().wait()
                stopped = word in sampling.stop
                if stopped:
                    finish = "stop"
                elif k + 1 == len(words):
                    finish = "stop"
                elif k + 1 == sampling.max_tokens:
                    finish = "length"
                else:
                    finish = None
                text = "" if stopped else (word if k == 0 else " " + word)
                tid = token_id(prompt, k, word)
                logprobs = None
                if sampling.logprobs is not None:
                    token = word if k == 0 else " " + word
                    tops = [TopLogprob(token, tid, fake_logprob(k), list(token.encode()))]
                    tops += [
                        TopLogprob(f"alt{j}", 50_000 + j, fake_logprob(k) - j, list(f"alt{j}".encode()))
                        for j in range(1, sampling.logprobs)
                    ]
                    logprobs = [
                        TokenLogprobs(
                            token, tid, fake_logprob(k), list(token.encode()), tops[: sampling.logprobs]
                        )
                    ]
                finished = finish is not None
                yield TextOutput(rid, text, [tid], logprobs, finish, len(words), k + 1, self.cached_tokens)
                if finished:
                    return
        finally:
            self._live.discard(rid)
            if not finished:
                self.aborted.append(rid)

    async def tokenize(
        self, prompt: Any, *, add_special_tokens: bool = True, token_strs: bool = False
    ) -> TokenizeReply:
        """/tokenize: the prompt's words as generate would echo them (their made-up ids)."""
        ids = [token_id(prompt, k, word) for k, word in enumerate(prompt_words(prompt))]
        return TokenizeReply(0, ids, [f"t{i}" for i in ids] if token_strs else None)

    async def detokenize(self, token_ids: list[int]) -> str:
        return " ".join(f"t{t}" for t in token_ids)


def make_app(
    engine: FakeEngine | None = None, api_key: str | None = None, **settings_fields: Any
) -> tuple[FastAPI, FakeEngine]:
    engine = engine or FakeEngine()
    settings = ApiSettings(
        served_model_name=MODEL, api_key=api_key, sampling_defaults=DEFAULTS, **settings_fields
    )
    return create_app(engine, settings), engine  # type: ignore[arg-type]


def chat_body(content: str = "alpha beta gamma", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
