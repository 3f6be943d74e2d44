"""Benchmark workloads: requests made of token-id prompts and the number of tokens each must generate.

Prompts are token ids, never text, so a workload needs no tokenizer (a `--dummy-weights` built-in shape has
none) and both systems under test get exactly the same input. The random dataset draws every prompt length,
output length and token id from one seeded generator, so a seed names one workload on every machine.

The online serving benchmark (`bench serve`) also takes ShareGPT conversations: text prompts sent as chat
messages, since a client benchmarking some server has no tokenizer of its own. The offline benchmark takes a
dataset file too (JSONL or ShareGPT, see bench/dataset_file.py), tokenized with the model's tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minisgl_cli.config import BenchConfig, parse_length_range
from minisgl_cli.errors import UsageError
from minisgl_cli.wording import plural

RANDOM = "random"
SERVE_DATASETS = (RANDOM, "sharegpt")  # bench serve's: a server tokenizes text prompts itself


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
    first_id: int = 0,
) -> Workload:
    """`num_requests` prompts of uniformly random token ids in [first_id, vocab_size), lengths uniform in the
    inclusive (MIN, MAX) ranges."""
    if num_requests < 1:
        raise UsageError(f"a workload needs at least one request, not {num_requests}")
    for name, (lo, hi) in (("input", input_len), ("output", output_len)):
        if not 1 <= lo <= hi:
            raise UsageError(f"{name} length range ({lo}, {hi}) is invalid: need 1 <= MIN <= MAX")
    _check_seed(seed)
    if not 0 <= first_id < vocab_size:
        raise UsageError(f"token ids from {first_id} below {vocab_size}: the range is empty")
    # numpy's PCG64 stream is stable across platforms and releases, so a seed gives the same prompts anywhere.
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(input_len[0], input_len[1], size=num_requests, endpoint=True)
    out_lens = rng.integers(output_len[0], output_len[1], size=num_requests, endpoint=True)
    requests = [
        BenchRequest(prompt_ids=rng.integers(first_id, vocab_size, size=int(n)).tolist(), output_len=int(m))
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
            f"(got {plural(num_requests, 'request')}, prefix {prefix_len}, question {question_len}, "
            f"output {output_len})"
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


@dataclass(frozen=True)
class ChatRequest:
    """A text prompt, sent as one user message to a chat endpoint."""

    text: str
    output_len: int  # tokens to generate (eos ignored)


# The speakers a ShareGPT file names for the user's turns; "user" appears in some re-exports of the data.
_HUMAN = frozenset({"human", "user"})


def sharegpt_workload(
    path: Path, num_requests: int | None, output_len: tuple[int, int], seed: int
) -> list[ChatRequest]:
    """`num_requests` conversations (None: all of them) of a ShareGPT JSON file (a list of
    {"conversations": [{"from", "value"}]}), picked in a seeded random order; each becomes its first human
    turn, with an output length uniform in the inclusive (MIN, MAX) range."""
    if num_requests is not None and num_requests < 1:
        raise UsageError(f"a workload needs at least one request, not {num_requests}")
    lo, hi = output_len
    if not 1 <= lo <= hi:
        raise UsageError(f"output length range ({lo}, {hi}) is invalid: need 1 <= MIN <= MAX")
    _check_seed(seed)
    prompts = _first_human_turns(path)
    if not prompts:
        raise UsageError(f"ShareGPT file {path} has no conversation with a human turn")
    count = len(prompts) if num_requests is None else num_requests
    if len(prompts) < count:
        raise UsageError(
            f"ShareGPT file {path} has {plural(len(prompts), 'conversation')} with a human turn; "
            f"--num-prompts {count} needs that many"
        )
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(prompts))[:count]
    out_lens = rng.integers(lo, hi, size=count, endpoint=True)
    return [ChatRequest(prompts[int(i)], int(n)) for i, n in zip(picked, out_lens, strict=True)]


def _first_human_turns(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"dataset file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"dataset file {path} is not a readable JSON file: {exc}") from None
    if not isinstance(data, list):
        raise UsageError(f'dataset file {path}: expected a ShareGPT list of {{"conversations": [...]}}')
    prompts = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        first = next((t for t in turns if isinstance(t, dict) and t.get("from") in _HUMAN), None)
        text = first.get("value") if first is not None else None
        if isinstance(text, str) and text.strip():
            prompts.append(text)
    return prompts


def load_workload(
    bench: BenchConfig,
    vocab_size: int,
    tokenizer: Callable[[], Any | None] = lambda: None,
    *,
    whole_file: bool = False,
) -> Workload:
    """The workload a `[bench]` config describes: the random dataset (number of prompts, length ranges,
    seed), or a dataset file (bench/dataset_file.py) when `dataset` is a path.

    `tokenizer` loads the model's tokenizer, called only for a file with text prompts. `whole_file`: run every
    request of a file rather than `num_prompts` of them (the caller's choice when --num-prompts was not set).
    """
    if bench.dataset != RANDOM:
        from minisgl_cli.bench.dataset_file import file_workload

        num_requests = None if whole_file else bench.num_prompts
        output_len = _lengths("--output-len", bench.output_len)
        path = Path(bench.dataset)
        return file_workload(path, num_requests, output_len, bench.dataset_seed, vocab_size, tokenizer)
    return random_workload(
        bench.num_prompts,
        _lengths("--input-len", bench.input_len),
        _lengths("--output-len", bench.output_len),
        vocab_size,
        bench.dataset_seed,
    )


def load_serve_workload(
    bench: BenchConfig, dataset_path: Path | None, vocab_size: int
) -> list[BenchRequest] | list[ChatRequest]:
    """The requests of `bench serve`. random: token ids in [vocab_size // 10, vocab_size), skipping the bottom
    tenth because tokenizers put their special and byte tokens at the lowest ids; sharegpt: first human turns
    from `dataset_path`, with --output-len lengths."""
    if bench.dataset not in SERVE_DATASETS:
        expected = ", ".join(SERVE_DATASETS)
        raise UsageError(
            f"dataset {bench.dataset!r} is not supported by bench serve: expected one of {expected}"
        )
    output_len = _lengths("--output-len", bench.output_len)
    if bench.dataset == "sharegpt":
        if dataset_path is None:
            raise UsageError(
                "--dataset sharegpt reads its conversations from a file: add --dataset-path FILE"
            )
        return sharegpt_workload(dataset_path, bench.num_prompts, output_len, bench.dataset_seed)
    if dataset_path is not None:
        raise UsageError("--dataset-path is for --dataset sharegpt; the random dataset needs no file")
    if vocab_size < 2:
        raise UsageError(f"--vocab-size {vocab_size}: expected at least 2")
    input_len = _lengths("--input-len", bench.input_len)
    workload = random_workload(
        bench.num_prompts, input_len, output_len, vocab_size, bench.dataset_seed, first_id=vocab_size // 10
    )
    return workload.requests


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise UsageError(f"the dataset seed must be >= 0, not {seed}")


def _lengths(flag: str, text: str) -> tuple[int, int]:
    try:
        return parse_length_range(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected N or MIN,MAX with 1 <= MIN <= MAX") from None
