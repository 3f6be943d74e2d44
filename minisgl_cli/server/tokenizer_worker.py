"""A tokenizer worker: tokenizes the prompts of the requests it owns and detokenizes their outputs.

Requests are owned by rid % number of workers, both ways: the API sends a request (and any abort of it) to
its owner, and the scheduler sends the request's new tokens back to the same owner, so one process holds
each request's incremental detokenizer and stop-string state. A matched stop string ends the request
here (the API gets finish_reason "stop") and the scheduler is told to drop it and free its KV.

Prompts are tokenized (chat template and encoding) on TOKENIZE_THREADS threads, not in the loop, which
meanwhile goes on detokenizing and forwarding the other requests' outputs: HF's fast tokenizers release the
GIL while they encode. A thread hands its result back through a queue and wakes the loop with a byte on a
pipe; only the loop touches the sockets and the requests' state. A request aborted while it is being
tokenized is forgotten at once, and its result dropped when it comes. A prompt far over the context length
is refused from a bounded prefix (long_prompts.py). /tokenize and /detokenize queries run on the same
threads.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import zmq

from minisgl_cli.config import EngineConfig
from minisgl_cli.engine.builder import load_tokenizer
from minisgl_cli.engine.models.config import ModelConfig
from minisgl_cli.engine.outputs import TextStream
from minisgl_cli.engine.request import FinishReason, check_for_model
from minisgl_cli.engine.tokenize import encode_prompt, is_token_ids
from minisgl_cli.errors import UsageError
from minisgl_cli.model_source import ModelSource
from minisgl_cli.server.child import keep_running, prepare_child, report, startup_failures
from minisgl_cli.server.engine_client import IpcAddresses
from minisgl_cli.server.long_prompts import check_length
from minisgl_cli.server.messages import (
    AbortRequest,
    DetokenizeQuery,
    DetokenizeReply,
    GenerateRequest,
    Ready,
    Rejected,
    TextOutput,
    TokenizedRequest,
    TokenizeQuery,
    TokenizeReply,
    TokenLogprobs,
    TokenOutput,
    TopLogprob,
    pack,
    unpack,
)

log = logging.getLogger(__name__)

POLL_MS = 200  # how often an idle worker checks that it should go on (SIGTERM, parent alive)
# Two: a long prompt then delays only the prompts behind it on its thread, not every one after it; more
# would mostly contend for the same cores as the other processes.
TOKENIZE_THREADS = 2


def context_bound(engine: EngineConfig, source: ModelSource) -> int:
    """The most tokens a request can hold: the model's positions, or --context-length if fewer. Known before
    the engine starts; the scheduler's own limit may be lower still (a small KV cache), and it checks that."""
    positions = ModelConfig.from_hf(source.hf_config).max_position_embeddings
    return min(positions, engine.context_length) if engine.context_length is not None else positions


def tokenizer_main(
    index: int,
    source: ModelSource,
    vocab_size: int,
    addresses: IpcAddresses,
    log_level: str,
    context_length: int,
) -> None:
    """Process entry point (spawned by the launcher)."""
    parent = prepare_child(log_level)
    role = f"tokenizer-{index}"
    from transformers.utils import logging as hf_logging

    # transformers warns about every prompt longer than the model's context; the scheduler rejects those.
    hf_logging.set_verbosity_error()
    with startup_failures(addresses.ready, role):
        worker = TokenizerWorker(index, load_tokenizer(source), vocab_size, addresses, context_length)
    report(addresses.ready, Ready(role=role))
    worker.run(parent)


@dataclass
class _Live:
    """A request between its tokenization and its last output."""

    text: TextStream | None  # None without a tokenizer: outputs carry token ids only
    completion_tokens: int = 0


# What a tokenizing thread hands back: a request's ids, or an answer (a Rejected, a query's reply) for the API.
_Result = TokenizedRequest | Rejected | TokenizeReply | DetokenizeReply


def prepare(request: GenerateRequest, tokenizer: Any | None, vocab_size: int, context_length: int) -> _Result:
    """A request's prompt tokenized and its settings checked against the model, or its rejection (400).
    Runs on a tokenizing thread: it reads the tokenizer and nothing else."""
    sampling = request.sampling
    try:
        check_length(request.prompt, tokenizer, context_length)
        ids = encode_prompt(request.prompt, tokenizer, vocab_size)
        check_for_model(sampling, vocab_size, tokenizer is not None)
    except UsageError as exc:
        return Rejected(
            request.rid,
            400,
            str(exc),
            param=getattr(exc, "param", None) or _prompt_param(request.prompt),
            code=getattr(exc, "code", None),
        )
    return TokenizedRequest(request.rid, ids, sampling, request.max_tokens_explicit)


def answer(query: TokenizeQuery | DetokenizeQuery, tokenizer: Any | None, vocab_size: int) -> _Result:
    """A /tokenize or /detokenize query's reply, or its rejection (400). Runs on a tokenizing thread."""
    if isinstance(query, DetokenizeQuery):
        if tokenizer is None:
            return Rejected(
                query.rid, 400, "this model has no tokenizer to turn token ids into text", "tokens"
            )
        bad = [t for t in query.token_ids if not 0 <= t < vocab_size]
        if bad:
            message = f"token id {bad[0]} is out of range: the vocabulary has {vocab_size} tokens"
            return Rejected(query.rid, 400, message, "tokens")
        return DetokenizeReply(query.rid, tokenizer.decode(query.token_ids))
    param = _prompt_param(query.prompt)
    if tokenizer is None:
        return Rejected(
            query.rid, 400, "this model has no tokenizer: there is nothing to tokenize with", param
        )
    try:
        if isinstance(query.prompt, str):
            # As generation encodes a text prompt (encode_prompt), but empty text is fine to count here.
            ids = list(tokenizer.encode(query.prompt, add_special_tokens=query.add_special_tokens))
        else:
            ids = encode_prompt(query.prompt, tokenizer, vocab_size)
    except UsageError as exc:
        return Rejected(query.rid, 400, str(exc), param)
    strs = list(tokenizer.convert_ids_to_tokens(ids)) if query.token_strs else None
    return TokenizeReply(query.rid, ids, strs)


def _prompt_param(prompt: object) -> str:
    return "prompt" if isinstance(prompt, str) or is_token_ids(prompt) else "messages"


class TokenizerWorker:
    def __init__(
        self,
        index: int,
        tokenizer: Any | None,
        vocab_size: int,
        addresses: IpcAddresses,
        context_length: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_length = context_length
        ctx = zmq.Context.instance()
        self._inbox = ctx.socket(zmq.PULL)
        self._inbox.bind(addresses.tokenizers[index])
        self._scheduler = ctx.socket(zmq.PUSH)
        self._scheduler.connect(addresses.scheduler)
        self._api = ctx.socket(zmq.PUSH)
        self._api.connect(addresses.api)
        self._live: dict[int, _Live] = {}
        self._tokenizing: set[int] = set()  # requests and queries on a thread; an abort removes its rid
        self._threads = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="tokenize")
        self._results: queue.SimpleQueue[_Result] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)

    def run(self, parent: int) -> None:
        poller = zmq.Poller()
        poller.register(self._inbox, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        try:
            while keep_running(parent):
                ready = dict(poller.poll(POLL_MS))
                if self._wake_read in ready:
                    self._take_results()
                if self._inbox in ready:
                    self._handle(unpack(self._inbox.recv()))
        finally:
            self._threads.shutdown(wait=False, cancel_futures=True)

    def _handle(self, message: Any) -> None:
        if isinstance(message, list):  # one scheduler step's outputs for this worker's requests
            outputs = [out for out in map(self._detokenize, message) if out is not None]
            if outputs:
                self._api.send(pack(outputs))
        elif isinstance(message, GenerateRequest):
            tokenizer, vocab, context = self.tokenizer, self.vocab_size, self.context_length
            self._submit(message.rid, lambda: prepare(message, tokenizer, vocab, context))
        elif isinstance(message, (TokenizeQuery, DetokenizeQuery)):
            self._submit(message.rid, lambda: answer(message, self.tokenizer, self.vocab_size))
        elif isinstance(message, AbortRequest):
            if message.rid in self._tokenizing:
                self._tokenizing.discard(message.rid)  # its result is dropped when it comes
            elif self._live.pop(message.rid, None) is not None:
                self._scheduler.send(pack(message))
        else:
            log.error("tokenizer: unexpected message %s", type(message).__name__)

    def _submit(self, rid: int, work: Callable[[], _Result]) -> None:
        self._tokenizing.add(rid)

        def run() -> None:
            try:
                result = work()
            except Exception:  # a bug, or a tokenizer failing in a way of its own: the request must still end
                log.exception("tokenizer: request %d failed", rid)
                result = Rejected(rid, 500, "the tokenizer failed on this request")
            self._results.put(result)
            os.write(self._wake_write, b".")

        self._threads.submit(run)

    def _take_results(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                result = self._results.get_nowait()
            except queue.Empty:
                return
            self._deliver(result)

    def _deliver(self, result: _Result) -> None:
        if result.rid not in self._tokenizing:
            return  # aborted while it was being tokenized
        self._tokenizing.discard(result.rid)
        if not isinstance(result, TokenizedRequest):  # a rejection, or a query's reply
            self._api.send(pack(result))
            return
        ids, stop = result.input_ids, result.sampling.stop
        self._live[result.rid] = _Live(TextStream(self.tokenizer, ids, stop) if self.tokenizer else None)
        self._scheduler.send(pack(result))

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
