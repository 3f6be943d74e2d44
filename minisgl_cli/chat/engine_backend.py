"""The in-process backend: the LLM of minisgl_cli.engine, in this process."""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from minisgl_cli.chat.backend import Delta
from minisgl_cli.config import EngineConfig, SamplingConfig
from minisgl_cli.server.reasoning import ReasoningDelta

if TYPE_CHECKING:
    from minisgl_cli.engine.llm import LLM


class EngineBackend:
    location = "in-process"

    def __init__(self, llm: LLM) -> None:
        from minisgl_cli.server import reasoning

        self._llm = llm
        self.model = llm.model_name
        template = getattr(llm.tokenizer, "chat_template", None)
        name = reasoning.default_parser(llm.model_type, template if isinstance(template, str) else None)
        self._thinking = reasoning.PARSERS[name] if name else None  # splits each answer's thinking off

    @classmethod
    def load(cls, engine: EngineConfig) -> EngineBackend:
        from minisgl_cli.engine.llm import LLM  # torch and the model: only once a chat really starts

        return cls(LLM.from_config(engine))

    def stream(
        self,
        messages: list[dict[str, str]],
        settings: SamplingConfig,
        json_schema: dict[str, Any] | None = None,
        chosen: frozenset[str] = frozenset(),  # unused: `settings` already hold this model's defaults
    ) -> Iterator[Delta]:
        from minisgl_cli.engine.request import SamplingParams
        from minisgl_cli.engine.structured import StructuredOutput

        structured = (
            None if json_schema is None else StructuredOutput.json_schema(json_schema, param="json_schema")
        )
        params = SamplingParams(**dataclasses.asdict(settings), structured=structured)
        steps = self._llm.stream_deltas(messages, params)
        split = self._thinking() if self._thinking is not None else None
        try:
            while True:
                # Ctrl-C lands between engine steps, never inside one, so the scheduler is never left
                # half-updated; closing `steps` then aborts the request and frees its KV pages.
                with _sigint_between_steps():
                    step = next(steps, None)
                if step is None:
                    return
                finish = step.output.finish_reason if step.output is not None else None
                if split is None:
                    yield Delta(step.text, step.num_tokens, finish)
                    continue
                part = split.feed(step.text)
                if finish is not None:
                    rest = split.finish()
                    part = ReasoningDelta(part.reasoning + rest.reasoning, part.content + rest.content)
                yield Delta(part.content, step.num_tokens, finish, reasoning=part.reasoning)
        finally:
            steps.close()

    def close(self) -> None:
        self._llm.close()  # stops tensor-parallel ranks, if any; the weights go with this backend


@contextmanager
def _sigint_between_steps() -> Iterator[None]:
    """Hold back SIGINT for the duration of the block, then raise KeyboardInterrupt if one came."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread owns signals
        yield
        return
    received: list[int] = []

    def note(signum: int, _frame: Any) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
