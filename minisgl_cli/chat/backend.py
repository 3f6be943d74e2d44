"""What the REPL needs from a model, wherever it runs: stream one answer to a list of messages.

Two implementations: engine_backend.EngineBackend (the LLM in this process) and openai_backend.OpenAIBackend
(any OpenAI-compatible server). A failed answer raises MinisglError with one line for the user.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from minisgl_cli.config import SamplingConfig


@dataclass
class Delta:
    text: str  # may be "": a token that completes no character yet, or only a count or an ending
    tokens: int  # completion tokens so far (a server's own count once its usage report arrives)
    finish_reason: str | None = None  # on the last delta: "stop" or "length"
    reasoning: str = ""  # the model's thinking (Qwen3's <think> block), shown apart from the answer


class Backend(Protocol):
    model: str  # the model's name, for the banner and transcripts
    location: str  # "in-process" or the server's URL

    def stream(
        self,
        messages: list[dict[str, str]],
        settings: SamplingConfig,
        json_schema: dict[str, Any] | None = None,
        chosen: frozenset[str] = frozenset(),
    ) -> Iterator[Delta]:
        """The answer to `messages` as it is generated (JSON matching `json_schema` when given). Closing the
        iterator early cancels the answer."""
        ...

    def close(self) -> None: ...
