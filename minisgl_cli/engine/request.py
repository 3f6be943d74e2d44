"""What a request asks for (SamplingParams) and, later in this file, the scheduler's Req and Batch."""

from __future__ import annotations

from dataclasses import dataclass, field

from minisgl_cli.errors import UsageError


@dataclass
class SamplingParams:
    """Per-request sampling settings, OpenAI/vLLM semantics.

    temperature 0 means greedy. top_k <= 0 and top_p == 1 and min_p == 0 disable those filters.
    logprobs None: no logprobs; 0: the chosen token's; N: the chosen one's and the top N.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        def bad(name: str, expected: str) -> UsageError:
            return UsageError(f"invalid sampling parameter {name}={getattr(self, name)!r}: expected {expected}")

        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "a number in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "a number in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            # 0 is accepted as 'disabled' too, as in SGLang.
            if self.top_k != 0:
                raise bad("top_k", "-1 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "a number in [0, 1]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "a number in [-2, 2]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "a number in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", "a number in (0, 10]")
        if self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad("logprobs", "an integer in [0, 20]")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", "non-empty strings")
