"""A tokenizer worker: tokenizes the prompts of the requests it owns and detokenizes their outputs.

Requests are owned by rid % number of workers, both ways: the API sends a request (and any abort of it) to
its owner, and the scheduler sends the request's new tokens back to the same owner, so one process holds
each request's incremental detokenizer and stop-string state. A matched stop string ends the request
here (the API gets finish_reason "stop") and the scheduler is told to drop it and free its KV.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import zmq

from minisgl_cli.engine.builder import load_tokenizer
from minisgl_cli.engine.outputs import TextStream
from minisgl_cli.engine.request import FinishReason, check_for_model
from minisgl_cli.engine.tokenize import encode_prompt, is_token_ids
from minisgl_cli.errors import UsageError
from minisgl_cli.model_source import ModelSource
from minisgl_cli.server.child import keep_running, prepare_child, report, startup_failures
from minisgl_cli.server.engine_client import IpcAddresses
from minisgl_cli.server.messages import (
    AbortRequest,
    GenerateRequest,
    Ready,
    Rejected,
    TextOutput,
    TokenizedRequest,
    TokenLogprobs,
    TokenOutput,
    TopLogprob,
    pack,
    unpack,
)

log = logging.getLogger(__name__)

POLL_MS = 200  # how often an idle worker checks that it should go on (SIGTERM, parent alive)


def tokenizer_main(
    index: int, source: ModelSource, vocab_size: int, addresses: IpcAddresses, log_level: str
) -> None:
    """Process entry point (spawned by the launcher)."""
    parent = prepare_child(log_level)
    role = f"tokenizer-{index}"
    from transformers.utils import logging as hf_logging

    # transformers warns about every prompt longer than the model's context; the scheduler rejects those.
    hf_logging.set_verbosity_error()
    with startup_failures(addresses.ready, role):
        worker = TokenizerWorker(index, load_tokenizer(source), vocab_size, addresses)
    report(addresses.ready, Ready(role=role))
    worker.run(parent)


@dataclass
class _Live:
    """A request between its tokenization and its last output."""

    text: TextStream | None  # None without a tokenizer: outputs carry token ids only
    completion_tokens: int = 0


class TokenizerWorker:
    def __init__(self, index: int, tokenizer: Any | None, vocab_size: int, addresses: IpcAddresses) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        ctx = zmq.Context.instance()
        self._inbox = ctx.socket(zmq.PULL)
        self._inbox.bind(addresses.tokenizers[index])
        self._scheduler = ctx.socket(zmq.PUSH)
        self._scheduler.connect(addresses.scheduler)
        self._api = ctx.socket(zmq.PUSH)
        self._api.connect(addresses.api)
        self._live: dict[int, _Live] = {}

    def run(self, parent: int) -> None:
        while keep_running(parent):
            if not self._inbox.poll(POLL_MS):
                continue
            message = unpack(self._inbox.recv())
            if isinstance(message, list):  # one scheduler step's outputs for this worker's requests
                outputs = [out for out in map(self._detokenize, message) if out is not None]
                if outputs:
                    self._api.send(pack(outputs))
            elif isinstance(message, GenerateRequest):
                self._tokenize(message)
            elif isinstance(message, AbortRequest):
                if self._live.pop(message.rid, None) is not None:
                    self._scheduler.send(pack(message))
            else:
                log.error("tokenizer: unexpected message %s", type(message).__name__)

    def _tokenize(self, request: GenerateRequest) -> None:
        sampling = request.sampling
        try:
            ids = encode_prompt(request.prompt, self.tokenizer, self.vocab_size)
            check_for_model(sampling, self.vocab_size, self.tokenizer is not None)
        except UsageError as exc:
            param = getattr(exc, "param", None) or (
                "prompt" if isinstance(request.prompt, str) or is_token_ids(request.prompt) else "messages"
            )
            self._api.send(pack(Rejected(request.rid, 400, str(exc), param=param)))
            return
        text = TextStream(self.tokenizer, ids, sampling.stop) if self.tokenizer is not None else None
        self._live[request.rid] = _Live(text)
        self._scheduler.send(pack(TokenizedRequest(request.rid, ids, sampling, request.max_tokens_explicit)))

    def _detokenize(self, out: TokenOutput) -> TextOutput | None:
        live = self._live.get(out.rid)
        if live is None:
            return None  # aborted, or ended here by a stop string: later tokens are not shown
        live.completion_tokens += len(out.token_ids)
        reason = out.finish_reason
        delta = ""
        if live.text is not None:
            delta = live.text.push(out.token_ids)
            if live.text.stop_matched:
                if reason is None:  # the scheduler still runs it: free its KV now
                    self._scheduler.send(pack(AbortRequest(out.rid)))
                reason = FinishReason.STOP
            if reason is not None:
                delta += live.text.finish()
        if reason is not None:
            del self._live[out.rid]
        return TextOutput(
            rid=out.rid,
            text=delta,
            token_ids=out.token_ids,
            logprobs=self._logprobs(out),
            finish_reason=reason,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=live.completion_tokens,
            cached_tokens=out.cached_tokens,
        )

    def _logprobs(self, out: TokenOutput) -> list[TokenLogprobs] | None:
        if out.logprobs is None:
            return None
        entries = []
        for token_id, (logprob, top) in zip(out.token_ids, out.logprobs, strict=True):
            token = self._token_text(token_id)
            entries.append(
                TokenLogprobs(
                    token=token,
                    token_id=token_id,
                    logprob=logprob,
                    bytes=list(token.encode()),
                    top_logprobs=[
                        TopLogprob(t, i, lp, list(t.encode())) for i, lp in top for t in [self._token_text(i)]
                    ],
                )
            )
        return entries

    def _token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id])
