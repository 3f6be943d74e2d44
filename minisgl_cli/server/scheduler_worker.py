"""The server's scheduler process: the engine's Scheduler behind ZMQ.

Loop: take every message waiting (new tokenized requests, aborts) without blocking while there is work,
or block briefly when idle; run one scheduler step; send each request's new tokens to the tokenizer worker
that owns it (it detokenizes); now and then send EngineStats to the API (for /metrics). Admission checks
that need the engine's limits (prompt length, context length, queue length) happen here and come back to
the API as a Rejected message.
"""

from __future__ import annotations

import logging
import time

import zmq

from minisgl_cli.config import EngineConfig
from minisgl_cli.engine.builder import Engine, build_engine
from minisgl_cli.engine.request import FinishReason, Req
from minisgl_cli.errors import UsageError
from minisgl_cli.model_source import ModelSource
from minisgl_cli.server.child import keep_running, prepare_child, report, startup_failures
from minisgl_cli.server.engine_client import IpcAddresses
from minisgl_cli.server.messages import (
    AbortRequest,
    EngineStats,
    Ready,
    Rejected,
    TokenizedRequest,
    TokenOutput,
    pack,
    unpack,
)

log = logging.getLogger(__name__)

IDLE_POLL_MS = 200  # how long an idle scheduler waits for messages before checking it should go on
STATS_INTERVAL_S = 0.1  # the API's view of the engine (running, queued, KV use) is at most this old


def scheduler_main(
    cfg: EngineConfig, source: ModelSource, addresses: IpcAddresses, max_queue: int, log_level: str
) -> None:
    """Process entry point (spawned by the launcher)."""
    parent = prepare_child(log_level)
    with startup_failures(addresses.ready, "scheduler"):
        engine = build_engine(cfg, source)
        worker = SchedulerWorker(engine, addresses, max_queue)
    runner = engine.runner
    report(
        addresses.ready,
        Ready(
            role="scheduler",
            model_name=source.name,
            dtype=str(runner.dtype).removeprefix("torch."),
            device=str(runner.device),
            kv_tokens=engine.kv_tokens,
            context_length=engine.scheduler.context_len,
            max_seq_len=engine.scheduler.max_seq_len,
        ),
    )
    worker.run(parent)


class SchedulerWorker:
    def __init__(self, engine: Engine, addresses: IpcAddresses, max_queue: int) -> None:
        self.scheduler = engine.scheduler
        self.max_queue = max_queue
        ctx = zmq.Context.instance()
        self._inbox = ctx.socket(zmq.PULL)
        self._inbox.bind(addresses.scheduler)
        self._api = ctx.socket(zmq.PUSH)
        self._api.connect(addresses.api)
        self._tokenizers = []
        for address in addresses.tokenizers:
            sock = ctx.socket(zmq.PUSH)
            sock.connect(address)
            self._tokenizers.append(sock)
        self._reqs: dict[int, Req] = {}  # server request id -> the scheduler's request
        self._server_rid: dict[int, int] = {}  # the scheduler's Req.rid -> server request id
        self._sent: dict[int, int] = {}  # server request id -> generated tokens already sent
        self._stats_due = True
        self._stats_sent_at = 0.0

    def run(self, parent: int) -> None:
        poller = zmq.Poller()
        poller.register(self._inbox, zmq.POLLIN)
        while keep_running(parent):
            if poller.poll(self._poll_timeout_ms()):
                self._receive_all()
            if self.scheduler.has_work:
                self._send_outputs(self.scheduler.step())
                self._stats_due = True
            self._maybe_send_stats()

    def _poll_timeout_ms(self) -> int:
        if self.scheduler.has_work:
            return 0
        if self._stats_due:  # wake up in time to send them
            wait = STATS_INTERVAL_S - (time.monotonic() - self._stats_sent_at)
            return max(0, min(IDLE_POLL_MS, int(wait * 1000) + 1))
        return IDLE_POLL_MS

    # ---- messages in

    def _receive_all(self) -> None:
        while True:
            try:
                data = self._inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = unpack(data)
            for item in message if isinstance(message, list) else [message]:
                if isinstance(item, TokenizedRequest):
                    self._add(item)
                elif isinstance(item, AbortRequest):
                    self._abort(item.rid)
                else:
                    log.error("scheduler: unexpected message %s", type(item).__name__)
            self._stats_due = True

    def _add(self, item: TokenizedRequest) -> None:
        scheduler = self.scheduler
        if len(scheduler.waiting) >= self.max_queue:
            self._reject(
                item.rid,
                503,
                f"the server is at capacity: {len(scheduler.waiting)} requests are already waiting; retry later",
                code="queue_full",
            )
            return
        n, m = len(item.input_ids), item.sampling.max_tokens
        if item.max_tokens_explicit and n + m > scheduler.max_seq_len:
            self._reject(
                item.rid,
                400,
                f"the prompt ({n} tokens) plus max_tokens ({m}) is {n + m} tokens, more than the "
                f"{scheduler.max_seq_len} this model can hold: shorten the prompt or lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
            return
        try:
            req = scheduler.add(item.input_ids, item.sampling)
        except UsageError as exc:
            self._reject(item.rid, 400, str(exc), param="messages", code="context_length_exceeded")
            return
        self._reqs[item.rid] = req
        self._server_rid[req.rid] = item.rid
        self._sent[item.rid] = 0

    def _abort(self, rid: int) -> None:
        req = self._reqs.get(rid)
        if req is not None:  # else: finished already, or rejected
            self.scheduler.finish(req, FinishReason.ABORT)
            self._forget(rid, req)

    def _reject(
        self, rid: int, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        self._api.send(pack(Rejected(rid, status, message, param, code)))

    # ---- messages out

    def _send_outputs(self, reqs: list[Req]) -> None:
        batches: list[list[TokenOutput]] = [[] for _ in self._tokenizers]
        for req in reqs:
            rid = self._server_rid[req.rid]
            start = self._sent[rid]
            new = req.output_ids[start:]
            self._sent[rid] = start + len(new)
            logprobs = req.output_logprobs[start:] if req.sampling.logprobs is not None else None
            batches[rid % len(batches)].append(
                TokenOutput(rid, new, logprobs, req.finish_reason, req.prompt_len, req.num_cached)
            )
            if req.finished:
                self._forget(rid, req)
        for sock, batch in zip(self._tokenizers, batches, strict=True):
            if batch:
                sock.send(pack(batch))

    def _forget(self, rid: int, req: Req) -> None:
        del self._reqs[rid], self._server_rid[req.rid], self._sent[rid]

    def _maybe_send_stats(self) -> None:
        now = time.monotonic()
        if not self._stats_due or now - self._stats_sent_at < STATS_INTERVAL_S:
            return
        s = self.scheduler.stats()
        self._api.send(
            pack(
                EngineStats(
                    num_running=s.num_running,
                    num_waiting=s.num_waiting,
                    kv_pages_used=s.pages_used,
                    kv_pages_total=s.pages_total,
                    page_size=self.scheduler.allocator.page_size,
                    prefix_hit_tokens=s.prefix_hit_tokens,
                    prefix_queried_tokens=s.prefix_queried_tokens,
                    num_preemptions=s.num_preemptions,
                )
            )
        )
        self._stats_due = False
        self._stats_sent_at = now
