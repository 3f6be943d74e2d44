"""Per-second token rates, shared by the result types of every benchmark that counts tokens over a wall time."""

from __future__ import annotations


class TokenRates:
    """Mixin for a result dataclass with `input_tokens`, `output_tokens` and `elapsed_s` fields."""

    input_tokens: int
    output_tokens: int
    elapsed_s: float

    @property
    def input_tok_per_s(self) -> float:
        return self.input_tokens / self.elapsed_s

    @property
    def output_tok_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tok_per_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.elapsed_s
