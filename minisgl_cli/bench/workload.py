"""Benchmark workloads: requests made of token-id prompts and the number of tokens each must generate.

Prompts are token ids, never text, so a workload needs no tokenizer (a `--dummy-weights` built-in shape has
none) and both systems under test get exactly the same input. The random dataset draws every prompt length,
output length and token id from one seeded generator, so a seed names one workload on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minisgl_cli.config import BenchConfig, parse_length_range
from minisgl_cli.errors import UsageError

DATASETS = ("random",)


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    output_len: int  # tokens to generate: the run ignores eos, so exactly this many

    @property
    def input_len(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class Workload:
    requests: list[BenchRequest]

    @property
    def input_tokens(self) -> int:
        return sum(r.input_len for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    @property
    def max_seq_len(self) -> int:
        """The longest prompt + output of any request: what the engine's context must hold."""
        return max(r.input_len + r.output_len for r in self.requests)


def random_workload(
    num_requests: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    vocab_size: int,
    seed: int,
) -> Workload:
    """`num_requests` prompts of uniformly random token ids, lengths uniform in the inclusive (MIN, MAX) ranges."""
    if num_requests < 1:
        raise UsageError(f"a workload needs at least one request, not {num_requests}")
    for name, (lo, hi) in (("input", input_len), ("output", output_len)):
        if not 1 <= lo <= hi:
            raise UsageError(f"{name} length range ({lo}, {hi}) is invalid: need 1 <= MIN <= MAX")
    if seed < 0:
        raise UsageError(f"the dataset seed must be >= 0, not {seed}")
    # numpy's PCG64 stream is stable across platforms and releases, so a seed gives the same prompts anywhere.
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(input_len[0], input_len[1], size=num_requests, endpoint=True)
    out_lens = rng.integers(output_len[0], output_len[1], size=num_requests, endpoint=True)
    requests = [
        BenchRequest(prompt_ids=rng.integers(0, vocab_size, size=int(n)).tolist(), output_len=int(m))
        for n, m in zip(in_lens, out_lens, strict=True)
    ]
    return Workload(requests)


def shared_prefix_workload(
    num_requests: int, prefix_len: int, question_len: int, output_len: int, vocab_size: int, seed: int
) -> Workload:
    """Requests that share one `prefix_len`-token prefix (a system prompt) followed by `question_len` tokens
    of their own: the workload a prefix cache is for. Token ids are uniformly random from `seed`."""
    if num_requests < 1 or prefix_len < 1 or question_len < 1 or output_len < 1:
        raise UsageError(
            "a shared-prefix workload needs at least 1 request and lengths >= 1 "
            f"(got {num_requests} requests, prefix {prefix_len}, question {question_len}, output {output_len})"
        )
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, vocab_size, size=prefix_len).tolist()
    requests = [
        BenchRequest(
            prompt_ids=prefix + rng.integers(0, vocab_size, size=question_len).tolist(), output_len=output_len
        )
        for _ in range(num_requests)
    ]
    return Workload(requests)


def load_workload(bench: BenchConfig, vocab_size: int) -> Workload:
    """The workload a `[bench]` config describes (dataset, number of prompts, length ranges, seed)."""
    if bench.dataset not in DATASETS:
        raise UsageError(f"dataset {bench.dataset!r} is not supported: expected one of {', '.join(DATASETS)}")
    return random_workload(
        bench.num_prompts,
        _lengths("--input-len", bench.input_len),
        _lengths("--output-len", bench.output_len),
        vocab_size,
        bench.dataset_seed,
    )


def _lengths(flag: str, text: str) -> tuple[int, int]:
    try:
        return parse_length_range(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected N or MIN,MAX with 1 <= MIN <= MAX") from None
