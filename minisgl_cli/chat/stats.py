"""The line under each answer: tokens, tokens per second and time to first token."""

from __future__ import annotations

import time
from dataclasses import dataclass

from minisgl_cli.chat.backend import Delta
from minisgl_cli.wording import plural

STOPPED = "stopped"  # the finish reason of an answer cut short with Ctrl-C


@dataclass
class TurnStats:
    tokens: int = 0
    ttft: float | None = None  # seconds from the request to its first token
    seconds: float = 0.0  # from the request to its last token
    finish_reason: str | None = None

    def summary(self) -> str:
        parts = [plural(self.tokens, "token")]
        # Decode speed after the first token: the prompt's prefill is what TTFT already shows.
        if self.ttft is not None and self.tokens > 1 and self.seconds > self.ttft:
            parts.append(f"{(self.tokens - 1) / (self.seconds - self.ttft):.1f} tok/s")
        if self.ttft is not None:
            parts.append(f"TTFT {self.ttft * 1000:.0f} ms")
        if self.finish_reason == "length":
            parts.append("max_tokens reached")
        elif self.finish_reason == STOPPED:
            parts.append(STOPPED)
        return " · ".join(parts)


class Meter:
    """Times one answer from the moment it is asked for; feed it every delta."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self.stats = TurnStats()

    def observe(self, delta: Delta) -> None:
        now = time.perf_counter() - self._start
        if delta.tokens > self.stats.tokens:
            if self.stats.ttft is None:
                self.stats.ttft = now
            self.stats.seconds = now
        self.stats.tokens = delta.tokens  # a server's usage report may correct the count
        if delta.finish_reason is not None:
            self.stats.finish_reason = delta.finish_reason
