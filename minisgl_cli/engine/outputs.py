"""What a finished request returns (RequestOutput), and OutputBuilder, which turns a request's tokens into
text as they arrive: incremental detokenization, then stop strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minisgl_cli.engine.detokenizer import IncrementalDetokenizer
from minisgl_cli.engine.request import FinishReason, Req
from minisgl_cli.engine.stop import StopMatcher


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]  # the N most likely (token id, logprob), best first


@dataclass
class RequestOutput:
    index: int  # position of the prompt in the call's input
    text: str
    token_ids: list[int]  # generated ids, including the eos / stop token / token completing a stop string
    finish_reason: str  # "stop" or "length"
    usage: Usage
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for


class TextStream:
    """The text of one request's generated tokens as they arrive: incremental detokenization, then stop
    strings. Shared by the in-process OutputBuilder and the server's tokenizer workers."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = StopMatcher(stop) if stop else None
        self._parts: list[str] = []
        self.stop_matched = False

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def push(self, ids: list[int]) -> str:
        """The text delta the new ids complete. After it, check `stop_matched`: the request should then end
        (its last id is the one that completed the stop string) and later ids are ignored."""
        if self.stop_matched or not ids:
            return ""
        return self._emit(self._detok.push(ids))

    def finish(self) -> str:
        """The text still held back once the request has ended (an incomplete character, a possible
        beginning of a stop string that never completed)."""
        if self.stop_matched:
            return ""
        tail = self._emit(self._detok.flush())
        if self._stop is not None and not self.stop_matched:
            held = self._stop.flush()
            self._parts.append(held)
            tail += held
        return tail

    def _emit(self, text: str) -> str:
        if self._stop is not None and text:
            text, self.stop_matched = self._stop.feed(text)
        self._parts.append(text)
        return text


class OutputBuilder:
    """One request's text, built as its tokens arrive. Without a tokenizer the text stays ""."""

    def __init__(self, index: int, req: Req, tokenizer: Any | None) -> None:
        self.index = index
        self.req = req
        self._text = (
            TextStream(tokenizer, req.prompt_ids, req.sampling.stop) if tokenizer is not None else None
        )
        self._num_seen = 0  # generated tokens already detokenized

    @property
    def has_stop_strings(self) -> bool:
        """Whether its text must be checked for stop strings as it grows (else it can be decoded at the end)."""
        return self._text is not None and bool(self.req.sampling.stop)

    @property
    def stop_matched(self) -> bool:
        return self._text is not None and self._text.stop_matched

    def update(self) -> str:
        """The text delta of the tokens generated since the last call. After it, check `stop_matched`: the
        caller then finishes the request (its token_ids end with the token that completed the stop)."""
        start = self.req.prompt_len + self._num_seen
        new = self.req.token_ids[start:]
        self._num_seen += len(new)
        return self._text.push(new) if self._text is not None else ""

    def finish(self) -> str:
        """The text still held back, once the request has finished."""
        return self._text.finish() if self._text is not None else ""

    def output(self) -> RequestOutput:
        req = self.req
        token_ids = req.output_ids
        logprobs = None
        if req.sampling.logprobs is not None:
            logprobs = [
                TokenLogprob(token_id=t, logprob=lp, top_logprobs=top)
                for t, (lp, top) in zip(token_ids, req.output_logprobs, strict=True)
            ]
        reason = FinishReason.STOP if self.stop_matched else req.finish_reason
        assert reason is not None, "output() of an unfinished request"
        return RequestOutput(
            index=self.index,
            text=self._text.text if self._text is not None else "",
            token_ids=token_ids,
            finish_reason=reason,
            usage=Usage(
                prompt_tokens=req.prompt_len, completion_tokens=len(token_ids), cached_tokens=req.num_cached
            ),
            logprobs=logprobs,
        )
