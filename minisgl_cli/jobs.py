"""`minisgl generate`'s input lines turned into jobs, and finished requests turned into output records.

Pure (no model, no files): every rule about what a line may hold is testable on its own.
Two input shapes are accepted, line by line:
  - plain:  {"prompt": str | [token ids]} or {"messages": [...]}, optional "id", optional sampling fields;
  - OpenAI Batch: {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}.
Each job remembers its shape, so its output record has the matching one.
Output constraints and logit_bias take the API's fields and rules (server/protocol.py, one place for both):
`response_format`, vLLM's `structured_outputs` and `guided_*`, SGLang's `regex` and `ebnf`, OpenAI's
`logit_bias`. Keys this module does not know are ignored: datasets often carry extra columns (reference
answers, metadata) and OpenAI bodies carry options with no meaning here (model, user, ...).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.errors import UsageError

if TYPE_CHECKING:
    from minisgl_cli.engine.llm import RequestOutput

Message = dict[str, str]
Prompt = str | list[int] | list[Message]

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"


class LineError(ValueError):
    """Why one input line cannot become a job (the line number is added by the caller)."""


@dataclass
class Job:
    id: str  # unique in the input: the plain line's "id" (default: its 1-based line number) or the Batch custom_id
    line_no: int
    prompt: Prompt
    sampling: SamplingParams
    batch_url: str | None = None  # the OpenAI endpoint of a Batch line; None for a plain line


@dataclass
class BadLine:
    line_no: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.reason}"


@dataclass
class ParsedInput:
    jobs: list[Job]
    bad: list[BadLine]


def parse_lines(lines: Iterable[str | bytes], defaults: SamplingParams) -> ParsedInput:
    """Every non-blank line (text, or raw bytes read from a file) becomes a job or a BadLine.

    Duplicate ids raise UsageError: with two answers for one id, neither the output nor a later --resume could
    tell them apart.
    """
    jobs: list[Job] = []
    bad: list[BadLine] = []
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            jobs.append(parse_line(text, line_no, defaults))
        except LineError as exc:
            bad.append(BadLine(line_no, str(exc)))
    _check_unique_ids(jobs)
    return ParsedInput(jobs, bad)


def parse_line(text: str | bytes, line_no: int, defaults: SamplingParams) -> Job:
    # Bytes are decoded per line, so one badly encoded line costs that line only, not the whole file.
    try:
        obj = json.loads(text)
    except UnicodeDecodeError:
        raise LineError("not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise LineError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {_json_type(obj)}")
    if "body" in obj or "custom_id" in obj or "url" in obj:
        return _batch_job(obj, line_no, defaults)
    prompt = _plain_prompt(obj)
    return Job(id=_plain_id(obj, line_no), line_no=line_no, prompt=prompt, sampling=_sampling(obj, defaults))


def _plain_id(obj: dict[str, Any], line_no: int) -> str:
    if "id" not in obj:
        return str(line_no)
    value = obj["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise LineError(f"field 'id': expected a non-empty string or an integer, got {_show(value)}")
    return str(value)


def _batch_job(obj: dict[str, Any], line_no: int, defaults: SamplingParams) -> Job:
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or custom_id == "":
        raise LineError(f"Batch line: field 'custom_id': expected a non-empty string, got {_show(custom_id)}")
    method = obj.get("method", "POST")
    if method != "POST":
        raise LineError(f"Batch line: field 'method': expected \"POST\", got {_show(method)}")
    url = obj.get("url")
    if url not in (CHAT_URL, COMPLETIONS_URL):
        raise LineError(
            f'Batch line: field \'url\': expected "{CHAT_URL}" or "{COMPLETIONS_URL}", got {_show(url)}'
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError(f"Batch line: field 'body': expected a JSON object, got {_show(body)}")
    n = body.get("n")
    if n is not None and n != 1:
        raise LineError(f"Batch line: field 'n': only 1 choice per request is supported, got {_show(n)}")
    need = "messages" if url == CHAT_URL else "prompt"
    if need not in body:
        raise LineError(f"Batch line: 'body' has no '{need}' (required by {url})")
    prompt = _messages(body["messages"]) if need == "messages" else _text_or_ids(body["prompt"])
    return Job(
        id=custom_id, line_no=line_no, prompt=prompt, sampling=_sampling(body, defaults), batch_url=url
    )


def _plain_prompt(obj: dict[str, Any]) -> Prompt:
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt and has_messages:
        raise LineError("has both 'prompt' and 'messages'; give one")
    if has_messages:
        return _messages(obj["messages"])
    if has_prompt:
        return _text_or_ids(obj["prompt"])
    raise LineError("missing 'prompt' or 'messages'")


def _text_or_ids(value: Any) -> str | list[int]:
    if isinstance(value, str):
        if value == "":
            raise LineError("field 'prompt': is empty")
        return value
    if isinstance(value, list) and value and all(_is_int(t) and t >= 0 for t in value):
        return value
    raise LineError(
        f"field 'prompt': expected a non-empty string or a non-empty list of token ids (integers >= 0), got {_show(value)}"
    )


def _messages(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise LineError(f"field 'messages': expected a non-empty list of messages, got {_show(value)}")
    out: list[Message] = []
    for i, msg in enumerate(value):
        where = f"field 'messages'[{i}]"
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not msg["role"]:
            raise LineError(f"{where}: expected an object with a 'role' string, got {_show(msg)}")
        out.append({"role": msg["role"], "content": _content(msg.get("content"), where)})
    return out


def _content(value: Any, where: str) -> str:
    # OpenAI also allows content as a list of parts; only text parts can be honoured by a text model.
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
    ):
        return "".join(p["text"] for p in value)
    raise LineError(f"{where}: 'content' must be a string or a list of text parts, got {_show(value)}")


# --- sampling fields ------------------------------------------------------------------------------------------


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LineError("a number")
    return float(value)


def _integer(value: Any) -> int:
    if not _is_int(value):
        raise LineError("an integer")
    return value


def _seed(value: Any) -> int:
    # Bounded so every sampler backend can seed a generator with it (torch takes a 64-bit seed).
    if not _is_int(value) or not 0 <= value < 2**63:
        raise LineError("an integer in [0, 2**63)")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise LineError("true or false")
    return value


def _stop(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise LineError("a string or a list of strings")


def _token_ids(value: Any) -> list[int]:
    if isinstance(value, list) and all(_is_int(t) and t >= 0 for t in value):
        return value
    raise LineError("a list of token ids (integers >= 0)")


# Field name -> parser returning the SamplingParams value (raising LineError with what was expected).
SAMPLING_FIELDS: dict[str, Callable[[Any], Any]] = {
    "max_tokens": _integer,
    "temperature": _number,
    "top_p": _number,
    "top_k": _integer,
    "min_p": _number,
    "seed": _seed,
    "stop": _stop,
    "frequency_penalty": _number,
    "presence_penalty": _number,
    "repetition_penalty": _number,
    "ignore_eos": _boolean,
    "stop_token_ids": _token_ids,
}
# OpenAI renamed max_tokens for chat; both names are accepted everywhere.
SAMPLING_ALIASES = {"max_completion_tokens": "max_tokens"}


# Parsed as the HTTP API parses them (engine constraints and logit_bias).
API_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
              "guided_grammar", "regex", "ebnf", "logit_bias")  # fmt: skip


# Fields that change what a chat answer is, which a line's plain text output cannot carry: refused, not dropped.
SERVER_ONLY = ("tools", "tool_choice", "functions", "function_call")


def _api_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """The line's output constraint and logit_bias, as SamplingParams fields (LineError when invalid)."""
    for key in SERVER_ONLY:
        if obj.get(key) not in (None, [], "none"):
            raise LineError(
                f"field '{key}': tool calling is for `minisgl serve`; generate's output is plain text"
            )
    given = {k: obj[k] for k in API_FIELDS if obj.get(k) is not None}
    if not given:
        return {}
    from pydantic import ValidationError

    from minisgl_cli.server.protocol import OpenAIRequest

    try:
        fields = OpenAIRequest.model_validate(given)
        return {"structured": fields.structured(), "logit_bias": fields.token_bias}
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        raise LineError(f"field '{where}': {message}") from None
    except UsageError as exc:
        raise LineError(str(exc)) from None


def _sampling(obj: dict[str, Any], defaults: SamplingParams) -> SamplingParams:
    """`defaults` with the line's own fields on top. null means 'not given': OpenAI clients send explicit nulls."""
    overrides: dict[str, Any] = _api_fields(obj)
    for key, value in obj.items():
        name = SAMPLING_ALIASES.get(key, key)
        if name not in SAMPLING_FIELDS or value is None:
            continue
        try:
            parsed = SAMPLING_FIELDS[name](value)
        except LineError as exc:
            raise LineError(f"field '{key}': expected {exc}, got {_show(value)}") from None
        if name in overrides and overrides[name] != parsed:
            raise LineError(
                f"fields 'max_tokens' and 'max_completion_tokens' disagree ({overrides[name]} vs {parsed})"
            )
        overrides[name] = parsed
    try:
        return dataclasses.replace(defaults, **overrides)
    except UsageError as exc:
        raise LineError(str(exc)) from None


def _check_unique_ids(jobs: list[Job]) -> None:
    first_line: dict[str, int] = {}
    for job in jobs:
        if job.id in first_line:
            raise UsageError(
                f"duplicate id {job.id!r} on input lines {first_line[job.id]} and {job.line_no}: ids must be unique "
                "(a line without 'id' gets its line number)"
            )
        first_line[job.id] = job.line_no


# --- output records -------------------------------------------------------------------------------------------


def output_record(job: Job, out: RequestOutput, model: str, created: int | None = None) -> dict[str, Any]:
    """The JSON object written for one finished request: the plain shape, or OpenAI's Batch output shape."""
    if job.batch_url is None:
        return {
            "id": job.id,
            "text": out.text,
            "token_ids": list(out.token_ids),
            "finish_reason": out.finish_reason,
            "usage": {
                "prompt_tokens": out.usage.prompt_tokens,
                "completion_tokens": out.usage.completion_tokens,
            },
        }
    body = _openai_body(job.batch_url, out, model, int(time.time()) if created is None else created)
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": job.id,
        "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
        "error": None,
    }


def _openai_body(url: str, out: RequestOutput, model: str, created: int) -> dict[str, Any]:
    if url == CHAT_URL:
        kind, prefix = "chat.completion", "chatcmpl"
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": out.text}}
    else:
        kind, prefix = "text_completion", "cmpl"
        choice = {"index": 0, "text": out.text}
    choice.update(logprobs=None, finish_reason=out.finish_reason)
    prompt_tokens, completion_tokens = out.usage.prompt_tokens, out.usage.completion_tokens
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def record_id(record: Any) -> str | None:
    """The job id an output record answers (for --resume): a Batch record's custom_id, else its id."""
    if not isinstance(record, dict):
        return None
    value = record.get("custom_id", record.get("id"))
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None


# --- small helpers --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _show(value: Any, limit: int = 60) -> str:
    """A value as JSON, cut short: a reason must stay one readable line even for a huge prompt."""
    text = json.dumps(value, ensure_ascii=False) if value is not None else "nothing"
    return text if len(text) <= limit else text[: limit - 3] + "..."
