"""Running one HTTP request's engine requests and merging their outputs.

Each choice (n per prompt, for each prompt of a batch) is one engine request, a Job; a Fanout runs them
concurrently and yields their outputs merged as they arrive; a Choice gathers one choice's outputs, and
usage_of sums the token counts of a response the way OpenAI reports them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.engine.tokenize import Prompt
from minisgl_cli.server import protocol as p
from minisgl_cli.server.engine_client import EngineClient
from minisgl_cli.server.messages import TextOutput, TokenLogprobs
from minisgl_cli.server.metrics import ApiMetrics


@dataclass
class Job:
    """One engine request: a choice of the response."""

    index: int  # the choice's index: prompt_index * n + j
    prompt: Prompt
    sampling: SamplingParams


def make_jobs(prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[Job]:
    """n choices per prompt. With a seed, choice j uses seed + j: reproducible, yet the choices differ."""
    jobs = []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            seeded = (
                sampling
                if sampling.seed is None or j == 0
                else dataclasses.replace(sampling, seed=sampling.seed + j)
            )
            jobs.append(Job(i * n + j, prompt, seeded))
    return jobs


class Fanout:
    """Jobs run concurrently, one task each; their outputs come out merged, in arrival order.

    Closing it cancels the tasks, which closes their engine iterators: a request still running is aborted
    and its KV freed. The cancellation is requested synchronously, so it happens even when close() runs in
    a task that is itself being cancelled.
    """

    def __init__(
        self,
        engine: EngineClient,
        jobs: list[Job],
        *,
        max_tokens_explicit: bool,
        metrics: ApiMetrics,
        arrival: float,
    ) -> None:
        self._queue: asyncio.Queue[tuple[int, TextOutput | Exception | None]] = asyncio.Queue()
        self._running = len(jobs)
        self._buffer: list[tuple[int, TextOutput]] = []
        self._tasks = [
            asyncio.create_task(self._pump(engine, job, max_tokens_explicit, metrics, arrival))
            for job in jobs
        ]

    async def _pump(
        self, engine: EngineClient, job: Job, max_tokens_explicit: bool, metrics: ApiMetrics, arrival: float
    ) -> None:
        timer = metrics.timer(arrival)
        try:
            stream = engine.generate(job.prompt, job.sampling, max_tokens_explicit=max_tokens_explicit)
            async with aclosing(stream) as outputs:
                async for out in outputs:
                    timer.on_output(out)
                    self._queue.put_nowait((job.index, out))
        except Exception as exc:  # RequestRejected, EngineUnavailable: the consumer raises it
            self._queue.put_nowait((job.index, exc))
        else:
            self._queue.put_nowait((job.index, None))

    async def _next(self) -> tuple[int, TextOutput] | None:
        while self._running:
            index, item = await self._queue.get()
            if item is None:
                self._running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                return index, item
        return None

    async def start(self) -> None:
        """Wait until every job has its first output. A stream calls this before it sends its headers, so
        that a rejection of any of its requests still gets its own HTTP status."""
        started: set[int] = set()
        while len(started) < len(self._tasks) and (item := await self._next()) is not None:
            self._buffer.append(item)
            started.add(item[0])

    async def events(self) -> AsyncIterator[tuple[int, TextOutput]]:
        """(choice index, output) until every job has finished; raises the first job error."""
        while self._buffer:
            yield self._buffer.pop(0)
        while (item := await self._next()) is not None:
            yield item

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


@dataclass
class Choice:
    """One choice's outputs so far."""

    index: int
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    logprob_chars: int = 0  # length of the token strings so far: the next token's text_offset
    finish_reason: str | None = None
    num_outputs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, out: TextOutput) -> None:
        self.texts.append(out.text)
        self.token_ids += out.token_ids
        if out.logprobs:
            self.logprobs += out.logprobs
            self.logprob_chars += sum(len(t.token) for t in out.logprobs)
        self.finish_reason = out.finish_reason
        self.num_outputs += 1
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens
        self.cached_tokens = out.cached_tokens

    @property
    def text(self) -> str:
        return "".join(self.texts)


def usage_of(choices: Sequence[Choice], n: int) -> p.Usage:
    """Each prompt's tokens once (its n choices share it), completion tokens summed over all choices."""
    prompt = cached = 0
    for start in range(0, len(choices), n):
        group = choices[start : start + n]
        prompt += max(c.prompt_tokens for c in group)
        cached += min(c.cached_tokens for c in group)  # what every choice found cached
    completion = sum(c.completion_tokens for c in choices)
    return p.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached),
    )


async def drain(fanout: Fanout, choices: list[Choice]) -> None:
    """Add every output to its choice until every job has finished: a response that is not streamed."""
    async for index, out in fanout.events():
        choices[index].add(out)
