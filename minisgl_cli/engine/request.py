"""What a request asks for (SamplingParams) and, later in this file, the scheduler's Req and Batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from minisgl_cli.engine.structured import StructuredOutput
from minisgl_cli.errors import InvalidParameter

if TYPE_CHECKING:
    from concurrent.futures import Future

    from minisgl_cli.engine.grammar import Matcher
    from minisgl_cli.engine.penalties import PenaltyState


@dataclass
class SamplingParams:
    """Per-request sampling settings, OpenAI/vLLM semantics.

    temperature 0 means greedy. top_k <= 0 and top_p == 1 and min_p == 0 disable those filters.
    logprobs None: no logprobs; 0: the chosen token's; N: the chosen one's and the top N.
    logit_bias: token id -> a number in [-100, 100] added to that token's logit before sampling (OpenAI's).
    structured: what the output must match (JSON schema, regex, ...; engine/structured.py), or None.
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
    logit_bias: dict[int, float] = field(default_factory=dict)
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        def bad(name: str, expected: str) -> InvalidParameter:
            return InvalidParameter(
                f"invalid sampling parameter {name}={getattr(self, name)!r}: expected {expected}", param=name
            )

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
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0:
                raise InvalidParameter(
                    f"logit_bias keys must be token ids (integers >= 0), got {token!r}", "logit_bias"
                )
            if not -100.0 <= bias <= 100.0:
                raise InvalidParameter(
                    f"logit_bias values must be in [-100, 100], got {bias!r} for {token}", "logit_bias"
                )
        if self.structured is not None:
            self.structured.check()


def check_for_model(sampling: SamplingParams, vocab_size: int, has_tokenizer: bool) -> None:
    """InvalidParameter for settings this model cannot take. SamplingParams checks what it can alone; these
    need the model: its vocabulary size, and a tokenizer to turn tokens into text."""
    outside = sorted(t for t in sampling.logit_bias if t >= vocab_size)
    if outside:
        raise InvalidParameter(
            f"logit_bias names token {outside[0]}, outside the model's vocabulary of {vocab_size} tokens",
            "logit_bias",
        )
    if not has_tokenizer:
        if sampling.stop:
            raise InvalidParameter(
                "stop strings need a tokenizer and this model has none: use stop_token_ids", "stop"
            )
        if sampling.structured is not None:
            param = sampling.structured.param
            raise InvalidParameter(f"{param} needs a tokenizer and this model has none", param)


class FinishReason:
    """Why a request ended (OpenAI's names)."""

    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by its caller (a client that went away)


@dataclass(eq=False)
class Req:
    """One request inside the scheduler: its tokens, its KV pages and how far its KV is computed.

    `token_ids` is prompt + generated so far, as far as the host knows. With overlap scheduling one more
    token may be in flight (`num_inflight`): sampled on the device by the step still running, its value not
    yet on the host. The scheduler's lengths count it (`total_len`); `token_ids`, `output_ids` and
    `num_output` never hold a placeholder for it.

    The first `num_computed` of the `total_len` tokens have their K/V in the pool (or being written by a
    launched step); the rest are fed in the next step(s): a whole or chunked prompt when admitted, the last
    sampled token while decoding (from the device when it is in flight), prompt + generated again after a
    preemption (so prefill and decode are one code path).
    """

    rid: int
    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int  # sampling.max_tokens clipped to what the context length (and KV pool) leaves
    seed: int  # the sampler's per-request seed: the user's, or one drawn by the scheduler
    token_ids: list[int] = field(default_factory=list)
    # KV state, owned by the scheduler: valid while the request is running.
    row: int = -1  # page-table row, -1 while it holds none
    pages: list[int] = field(default_factory=list)  # KV pages, in position order
    num_computed: int = 0
    # Tokens sampled by a launched step whose value the host does not know yet: 0 or 1 between steps (for a
    # moment 2, while the previous step's results are processed after the next step was launched).
    num_inflight: int = 0
    num_mapped: int = 0  # leading positions whose slots are written into the page-table row
    num_cached: int = 0  # prompt tokens whose K/V came from the prefix cache (usage.cached_tokens)
    cache_handle: object | None = None  # the prefix cache's lock on the matched prefix
    num_preemptions: int = 0
    arrival_step: int = 0  # the scheduler's step count when the request was queued (admission age bound)
    finish_reason: str | None = None
    # Token counts for penalties, on the device; made on the first sampling step of a penalised request.
    penalty_state: PenaltyState | None = None
    # (chosen token's logprob, top-N as (token id, logprob) pairs) per generated token, when asked for.
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    # Structured output: the compiled grammar, soon (while the request waits apart from the queue), then the
    # request's matcher (engine/grammar.py), which has accepted every token in `output_ids`.
    grammar: Future | None = None
    matcher: Matcher | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def seq_len(self) -> int:
        """Tokens known on the host."""
        return len(self.token_ids)

    @property
    def total_len(self) -> int:
        """The sequence's length as the scheduler counts it: known tokens plus the one in flight."""
        return len(self.token_ids) + self.num_inflight

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_sampled(self) -> int:
        """Tokens generated so far, the one in flight included (the sampler's step index of the next one)."""
        return self.total_len - self.prompt_len

    @property
    def num_pending(self) -> int:
        """Tokens still to be fed before the next token can be sampled."""
        return self.total_len - self.num_computed

    @property
    def num_cacheable(self) -> int:
        """Computed tokens whose ids the host knows: what may be offered to the prefix cache."""
        return min(self.num_computed, len(self.token_ids))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Batch:
    """What one step runs: each request feeds `extend_lens[i]` tokens from its `num_computed` on.

    The first `num_prefill` rows are prefill chunks (a prompt, or a part of it); the others decode one token
    each. A step of both kinds is a mixed step: decode rows ride along with a chunked prefill.

    `samples[i]` says whether request i samples a token this step: only when its chunk reaches the end of its
    tokens (a partial prefill chunk just fills the KV cache). Fixed at construction, before the step commits.
    """

    reqs: list[Req]
    extend_lens: list[int]
    num_prefill: int
    samples: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        pairs = zip(self.reqs, self.extend_lens, strict=True)
        self.samples = [r.num_computed + n == r.total_len for r, n in pairs]

    @property
    def is_prefill(self) -> bool:
        """Whether some row is a prefill chunk (the step is not a pure decode step)."""
        return self.num_prefill > 0

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.extend_lens[: self.num_prefill])
