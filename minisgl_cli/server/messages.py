"""What the server's processes say to each other over ZMQ: small dataclasses, msgpack on the wire.

    api --GenerateRequest/AbortRequest--> tokenizer worker --TokenizedRequest/AbortRequest--> scheduler
    scheduler --TokenOutput batch--> the request's tokenizer worker (detokenizes) --TextOutput batch--> api
    api --TokenizeQuery/DetokenizeQuery--> a tokenizer worker --TokenizeReply/DetokenizeReply--> api
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
class TokenizeQuery:
    """/tokenize: a prompt's token ids, as generation would see them; nothing runs."""

    rid: int
    prompt: str | ChatPrompt
    add_special_tokens: bool = True  # text only: a chat's template writes its own
    token_strs: bool = False  # also each token as the vocabulary spells it


@_register
@dataclass
class TokenizeReply:
    rid: int
    token_ids: list[int]
    token_strs: list[str] | None = None


@_register
@dataclass
class DetokenizeQuery:
    """/detokenize: the text of some token ids."""

    rid: int
    token_ids: list[int]


@_register
@dataclass
class DetokenizeReply:
    rid: int
    text: str


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
    exit_code: int = 1  # the error's CLI exit status: 2 for the user's mistake (errors.py), else 1


def _to_wire(value: Any) -> dict[str, Any]:
    # msgpack's `default`: called only for what it cannot pack itself, so a list of a million token ids is
    # packed in C rather than visited element by element here.
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        raise TypeError(f"cannot pack a {type(value).__name__}")
    if type(value).__name__ not in _TYPES:
        raise TypeError(f"{type(value).__name__} is not a registered message type")
    wire = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    wire[_TYPE_KEY] = type(value).__name__
    return wire


def _from_wire(fields: dict[Any, Any]) -> Any:
    # msgpack's `object_hook`: called for each map, innermost first; lists are left to C.
    name = fields.pop(_TYPE_KEY, None)
    return _TYPES[name](**fields) if name is not None else fields


def pack(message: Any) -> bytes:
    return msgpack.packb(message, default=_to_wire, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, object_hook=_from_wire)
