"""Offline throughput: a whole workload handed to the engine at once, timed from submission to the last output.

Every request runs with `ignore_eos` and `max_tokens` = its output length, so it generates exactly that many
tokens and both systems do the same work whatever the weights; tokens are sampled at one temperature
(0: greedy), with no top-k or top-p, on both systems. The counts in the result are what
the engine reports per request (usage), not what was asked for, so a request cut short would show.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from minisgl_cli.bench.progress import Progress, Tally
from minisgl_cli.bench.rates import TokenRates
from minisgl_cli.bench.workload import Workload
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.errors import UsageError

if TYPE_CHECKING:
    from minisgl_cli.engine.llm import LLM
    from minisgl_cli.engine.structured import StructuredOutput

# The untimed warm-up run: small, so it costs little, but it runs prefill, decode and sampling once.
WARMUP_INPUT_LEN = 16
WARMUP_OUTPUT_LEN = 4


@dataclass
class ThroughputResult(TokenRates):
    system: str  # "minisgl" or "hf"
    num_requests: int
    input_tokens: int
    output_tokens: int
    elapsed_s: float
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (engine only)
    # When each request finished, in seconds after the timed start (for --plot; not in the JSON report).
    finish_s: list[float] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s


def warmup_prompt(vocab_size: int) -> list[int]:
    """A fixed prompt for warm-up runs (token ids 1..16: any ids do; none is special to the timing)."""
    return [i % vocab_size for i in range(1, WARMUP_INPUT_LEN + 1)]


def check_fits(workload: Workload, max_seq_len: int) -> None:
    """UsageError if a request's prompt + output cannot fit in one sequence of the engine."""
    if workload.max_seq_len > max_seq_len:
        raise UsageError(
            f"a request needs {workload.max_seq_len} tokens (prompt + output) but the engine holds at most "
            f"{max_seq_len} per sequence: lower --input-len/--output-len, or raise --context-length/--kv-cache-tokens"
        )


def warm_up(llm: LLM) -> None:
    """One small untimed run: prefill, decode and sampling each run once before anything is timed."""
    llm.generate(warmup_prompt(llm.runner.model_config.vocab_size), exact_greedy(WARMUP_OUTPUT_LEN))


def run_offline(
    llm: LLM,
    workload: Workload,
    on_progress: Progress | None = None,
    *,
    system: str = "minisgl",
    warmup: bool = True,
    temperature: float = 0.0,
    structured: StructuredOutput | None = None,
) -> ThroughputResult:
    """Warm up (unless the caller did), then run every request of `workload` through `llm` in one call and time it.

    With `structured`, every request's output is constrained to it (and ends when it is complete); the warm-up
    compiles its grammar, so the timed run measures the masks, as a server that has seen the schema would.

    `on_progress(n)` is told of output tokens as every engine step makes them (for a progress bar; see
    bench/progress.py): `workload.output_tokens` in all. Its cost is inside the timing, so it must be cheap.
    """
    check_fits(workload, llm.scheduler.max_seq_len)
    if warmup:
        warm_up(llm)
        if structured is not None:
            prompt = warmup_prompt(llm.runner.model_config.vocab_size)
            llm.generate(
                prompt, SamplingParams(temperature=0.0, max_tokens=WARMUP_OUTPUT_LEN, structured=structured)
            )
    llm.scheduler.drop_cached_prefixes()  # nothing from an earlier run may be reused by the timed one
    prompts = [r.prompt_ids for r in workload.requests]
    params = [
        SamplingParams(
            temperature=temperature, max_tokens=r.output_len, ignore_eos=True, structured=structured
        )
        for r in workload.requests
    ]
    input_tokens = output_tokens = cached_tokens = 0
    finish_s: list[float] = []
    tally = Tally(on_progress, workload.output_tokens)
    start = time.perf_counter()
    for out in llm.iter_outputs(prompts, params, on_tokens=tally.add):
        finish_s.append(time.perf_counter() - start)
        input_tokens += out.usage.prompt_tokens
        output_tokens += out.usage.completion_tokens
        cached_tokens += out.usage.cached_tokens
        # A request that ended before its output length (its JSON complete) never makes the rest.
        tally.add(workload.requests[out.index].output_len - out.usage.completion_tokens)
    elapsed = time.perf_counter() - start
    tally.finish()
    return ThroughputResult(
        system, len(prompts), input_tokens, output_tokens, elapsed, cached_tokens, finish_s=finish_s
    )


def exact_greedy(max_tokens: int) -> SamplingParams:
    """Greedy, eos ignored: exactly `max_tokens` new tokens (greedy so that no sampler's cost differs)."""
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
