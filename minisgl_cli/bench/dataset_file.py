"""Dataset files of `bench offline --dataset FILE`: requests read from a file instead of drawn at random.

Two formats, told apart by the file's first character:

- JSONL (``{``): one request per line, ``{"prompt": text or [token ids], "output_len": N}``. A line without
  ``output_len`` gets one drawn from --output-len; blank lines are skipped and other keys ignored.
- ShareGPT JSON (``[``): a list of ``{"conversations": [{"from", "value"}, ...]}``; each conversation's first
  human turn is a prompt, with an output length drawn from --output-len (as bench serve does).

A file runs whole unless --num-prompts is given: then JSONL keeps its first N lines and ShareGPT N
conversations picked from --dataset-seed. Text prompts are encoded as raw text by the model's tokenizer, the
way the engine encodes a text prompt (no chat template): both systems under test get the same token ids.
Library code: errors are UsageError with the file (and line) at fault.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minisgl_cli.bench.workload import BenchRequest, Workload, sharegpt_workload
from minisgl_cli.engine.tokenize import is_token_ids
from minisgl_cli.errors import UsageError
from minisgl_cli.wording import plural

_JSONL_SHAPE = '{"prompt": text or [token ids], "output_len": N}'


@dataclass(frozen=True)
class FileRequest:
    """A request as the file gives it: its prompt is not tokenized yet."""

    prompt: str | list[int]
    output_len: int
    where: str  # "line 3": where the file holds it, for error messages


def file_workload(
    path: Path,
    num_requests: int | None,
    output_len: tuple[int, int],
    seed: int,
    vocab_size: int,
    tokenizer: Callable[[], Any | None],
) -> Workload:
    """The requests of a dataset file, tokenized. `num_requests` None: all of them. `tokenizer` loads the
    model's tokenizer; it is called only when some prompt is text."""
    requests = read_requests(path, num_requests, output_len, seed)
    tok = tokenizer() if any(isinstance(r.prompt, str) for r in requests) else None
    return Workload([BenchRequest(_token_ids(r, tok, vocab_size, path), r.output_len) for r in requests])


def read_requests(
    path: Path, num_requests: int | None, output_len: tuple[int, int], seed: int
) -> list[FileRequest]:
    """The requests of a JSONL or ShareGPT file (see the module docstring), prompts untokenized."""
    if num_requests is not None and num_requests < 1:
        raise UsageError(f"a workload needs at least one request, not {num_requests}")
    first = _first_character(path)
    if first == "[":
        chats = sharegpt_workload(path, num_requests, output_len, seed)
        return [FileRequest(c.text, c.output_len, "a ShareGPT prompt") for c in chats]
    if first == "{":
        return _read_jsonl(path, num_requests, output_len, seed)
    raise UsageError(
        f"dataset file {path} is neither JSONL (one {_JSONL_SHAPE} per line) nor a ShareGPT JSON list"
    )


def _first_character(path: Path) -> str:
    """The file's first non-blank character (enough to tell the formats apart without reading it all)."""
    if not path.exists():
        raise UsageError(
            f"dataset {str(path)!r} is not supported: expected 'random' or the path of a JSONL or "
            "ShareGPT JSON file (no such file)"
        )
    if not path.is_file():
        raise UsageError(f"dataset file {path} is not a file")
    try:
        with path.open("rb") as f:
            head = f.read(4096).lstrip()
    except OSError as exc:
        raise UsageError(f"cannot read dataset file {path}: {exc.strerror or exc}") from None
    if not head:
        raise UsageError(f"dataset file {path} is empty")
    return chr(head[0])


def _read_jsonl(
    path: Path, num_requests: int | None, output_len: tuple[int, int], seed: int
) -> list[FileRequest]:
    lo, hi = output_len
    if not 1 <= lo <= hi:
        raise UsageError(f"output length range ({lo}, {hi}) is invalid: need 1 <= MIN <= MAX")
    # Drawn only for lines that give no output_len, in file order: the same file and seed give the same lengths.
    rng = np.random.default_rng(seed)
    requests: list[FileRequest] = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if num_requests is not None and len(requests) == num_requests:
                    break
                if line.strip():
                    requests.append(_jsonl_request(line, f"line {number}", path, rng, output_len))
    except UnicodeDecodeError:
        raise UsageError(f"dataset file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"cannot read dataset file {path}: {exc.strerror or exc}") from None
    if not requests:
        raise UsageError(f"dataset file {path} holds no requests")
    if num_requests is not None and len(requests) < num_requests:
        raise UsageError(
            f"dataset file {path} has {plural(len(requests), 'request')}; "
            f"--num-prompts {num_requests} needs that many"
        )
    return requests


def _jsonl_request(
    line: str, where: str, path: Path, rng: np.random.Generator, output_len: tuple[int, int]
) -> FileRequest:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"dataset file {path} {where}: not valid JSON ({exc.msg})") from None
    if not isinstance(entry, dict) or "prompt" not in entry:
        raise UsageError(f"dataset file {path} {where}: expected {_JSONL_SHAPE}")
    prompt = entry["prompt"]
    if not (isinstance(prompt, str) and prompt) and not is_token_ids(prompt):
        raise UsageError(
            f"dataset file {path} {where}: the prompt must be non-empty text or a list of token ids"
        )
    if "output_len" in entry:
        n = entry["output_len"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UsageError(f"dataset file {path} {where}: output_len must be a positive integer, not {n!r}")
    else:
        n = int(rng.integers(output_len[0], output_len[1], endpoint=True))
    return FileRequest(prompt, n, where)


def _token_ids(request: FileRequest, tokenizer: Any | None, vocab_size: int, path: Path) -> list[int]:
    where = f"dataset file {path} {request.where}"
    if isinstance(request.prompt, str):
        if tokenizer is None:
            raise UsageError(
                f"{where}: a text prompt needs a tokenizer and this model has none: use token ids"
            )
        ids = list(tokenizer.encode(request.prompt))
        if not ids:
            raise UsageError(f"{where}: the prompt encodes to no tokens")
        return ids
    bad = next((t for t in request.prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise UsageError(f"{where}: token id {bad} is out of range: the vocabulary has {vocab_size} tokens")
    return request.prompt
