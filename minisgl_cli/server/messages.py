"""What the server's processes say to each other over ZMQ: small dataclasses, msgpack on the wire.

    api --GenerateRequest/AbortRequest--> tokenizer worker --TokenizedRequest/AbortRequest--> scheduler
    scheduler --TokenOutput batch--> the request's tokenizer worker (detokenizes) --TextOutput batch--> api
    scheduler --EngineStats--> api;   any stage --Rejected--> api (the request never ran)
    every process --Ready/Failed--> the launcher, once; the launcher stops them with SIGTERM (server/child.py)

`pack`/`unpack` turn any registered dataclass (nested ones, and lists of them, included) into bytes and
back; a message carries its type's name, so one socket can carry several kinds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgpack

from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.engine.structured import StructuredOutput
from minisgl_cli.engine.tokenize import ChatPrompt

_TYPE_KEY = "__t"
_TYPES: dict[str, type] = {}


def _register(cls: type) -> type:
    _TYPES[cls.__name__] = cls
    return cls


_register(SamplingParams)
_register(StructuredOutput)
_register(ChatPrompt)


@_register
@dataclass
class GenerateRequest:
    """A prompt to run: text, token ids, chat messages ({"role", "content"} dicts), or a ChatPrompt."""

    rid: int
    prompt: str | list[int] | list[dict[str, Any]] | ChatPrompt
    sampling: SamplingParams
    # The client set max_tokens itself: a prompt that leaves less room is an error, not a silent clip.
    max_tokens_explicit: bool = False


@_register
@dataclass
class TokenizedRequest:
    rid: int
    input_ids: list[int]
    sampling: SamplingParams
    max_tokens_explicit: bool = False


@_register
@dataclass
class AbortRequest:
    """Stop a request and free its KV: its client went away, or a stop string ended it."""

    rid: int


@_register
@dataclass
class TokenOutput:
    """One request's new tokens from one scheduler step."""

    rid: int
    token_ids: list[int]
    # (chosen token's logprob, top-N (token id, logprob) pairs) per token, when the request asked for them.
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int


@_register
@dataclass
class TopLogprob:
    token: str  # the token's text
    token_id: int
    logprob: float
    bytes: list[int]  # the token's text as UTF-8 (OpenAI's `bytes`)


@_register
@dataclass
class TokenLogprobs:
    token: str
    token_id: int
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


@_register
@dataclass
class TextOutput:
    """What the API streams for one request: the text delta of its newest tokens, and the counts so far.

    A request's deltas concatenate to its whole output text (stop strings already cut); the one with
    `finish_reason` set is its last.
    """

    rid: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None  # "stop" or "length" on the last output; "abort" if the engine dropped it
    prompt_tokens: int
    completion_tokens: int  # generated so far
    cached_tokens: int  # prompt tokens whose K/V came from the prefix cache


@_register
@dataclass
class Rejected:
    """A request refused before it ran: the API answers it with this HTTP status and OpenAI error body."""

    rid: int
    status: int
    message: str
    param: str | None = None
    code: str | None = None


@_register
@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_pages_used: int
    kv_pages_total: int
    page_size: int
    prefix_hit_tokens: int
    prefix_queried_tokens: int
    num_preemptions: int

    @property
    def kv_usage(self) -> float:
        return self.kv_pages_used / self.kv_pages_total if self.kv_pages_total else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0


@_register
@dataclass
class Ready:
    """A process can take work. The scheduler's also describes the engine, for the startup log and API."""

    role: str  # "scheduler", "tokenizer-0", ...
    model_name: str = ""
    dtype: str = ""
    device: str = ""
    kv_tokens: int = 0
    context_length: int = 0
    max_seq_len: int = 0  # longest prompt + output the engine can hold (context length and KV pool)


@_register
@dataclass
class Failed:
    """A process could not start (or died of an error): one human line, shown as the server's error."""

    role: str
    message: str


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if type(value).__name__ not in _TYPES:
            raise TypeError(f"{type(value).__name__} is not a registered message type")
        wire = {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
        wire[_TYPE_KEY] = type(value).__name__
        return wire
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def _from_wire(value: Any) -> Any:
    if isinstance(value, dict):
        name = value.get(_TYPE_KEY)
        fields = {k: _from_wire(v) for k, v in value.items() if k != _TYPE_KEY}
        return _TYPES[name](**fields) if name is not None else fields
    if isinstance(value, list):
        return [_from_wire(v) for v in value]
    return value


def pack(message: Any) -> bytes:
    return msgpack.packb(_to_wire(message), use_bin_type=True)


def unpack(data: bytes) -> Any:
    return _from_wire(msgpack.unpackb(data, raw=False, strict_map_key=False))
