"""The server's scheduler processes: the engine's Scheduler behind ZMQ, one process per tensor-parallel rank.

Rank 0 (the only rank without tensor parallelism) talks to the rest of the server. Loop: take every message
waiting (new tokenized requests, aborts) without blocking while there is work, or block briefly when idle;
run one scheduler step; send each request's new tokens to the tokenizer worker that owns it (it
detokenizes); now and then send EngineStats to the API (for /metrics) and, while requests run, log the
state line (state_log.py); on the way out, log what it served. Admission checks that need the engine's
limits (prompt length, context length, queue length) happen here and come back to the API as a Rejected
message.

Ranks 1..N-1 talk only to rank 0: each holds a whole Scheduler that replays rank 0's (the requests rank 0
accepted, the aborts, in order; engine/rank_sync.py) and runs every step with it. Rank 0 tells them to stop
when it shuts down.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import zmq

from minisgl_cli.config import EngineConfig
from minisgl_cli.engine.builder import Engine, build_engine
from minisgl_cli.engine.rank_sync import RankChannel, follow
from minisgl_cli.engine.request import FinishReason, Req
from minisgl_cli.engine.tp_ranks import RankPlace, join
from minisgl_cli.errors import InvalidParameter, UsageError
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
from minisgl_cli.server.state_log import StateLog
from minisgl_cli.wording import plural

# torch loads inside the functions that need it: the launcher imports this module for its entry point.

log = logging.getLogger(__name__)

IDLE_POLL_MS = 200  # how long an idle scheduler waits for messages before checking it should go on
STATS_INTERVAL_S = 0.1  # the API's view of the engine (running, queued, KV use) is at most this old


@dataclass(frozen=True)
class Rank:
    """Which tensor-parallel rank a scheduler process is, and where the ranks meet."""

    role: str  # the process's name in readiness reports and logs
    place: RankPlace = RankPlace(0, 1, 0, "")


def scheduler_main(
    cfg: EngineConfig,
    source: ModelSource,
    addresses: IpcAddresses,
    max_queue: int,
    log_interval: float,
    log_level: str,
    rank: Rank,
) -> None:
    """Process entry point (spawned by the launcher, once per rank)."""
    parent = prepare_child(log_level)
    with startup_failures(addresses.ready, rank.role):
        cfg, tp = join(cfg, rank.place)
        engine = build_engine(cfg, source, tp=tp)
        worker = (
            SchedulerWorker(RequestTable(engine), addresses, max_queue, log_interval)
            if tp.rank == 0
            else None
        )
    runner = engine.runner
    report(
        addresses.ready,
        Ready(
            role=rank.role,
            model_name=source.name,
            dtype=str(runner.dtype).removeprefix("torch."),
            device=str(runner.device),
            kv_tokens=engine.kv_tokens,
            context_length=engine.scheduler.context_len,
            max_seq_len=engine.scheduler.max_seq_len,
        ),
    )
    try:
        if worker is not None:
            worker.run(parent)
        else:
            # SIGTERM is not checked here: the launcher stops rank 0 too, which tells this rank to stop
            # between two steps.
            follow(engine.scheduler, RankChannel(tp))
    except RuntimeError as exc:
        if tp.size == 1:
            raise
        # Most likely another rank died (torch.distributed reports it as a RuntimeError); the launcher
        # watches every rank and stops the server, so one line here is enough (the trace at debug level).
        log.debug("%s stopped", rank.role, exc_info=True)
        log.error("%s stopped: %s", rank.role, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        # Not sys.exit: tearing down a process group whose peer is gone can abort the interpreter.
        logging.shutdown()
        os._exit(1)
    tp.destroy()


@dataclass
class _Tracked:
    req: Req
    sent: int = 0  # generated tokens already sent to the request's tokenizer worker


class RequestTable:
    """Rank 0's scheduler and its requests by server request id."""

    def __init__(self, engine: Engine) -> None:
        self.scheduler = engine.scheduler
        self.tracked: dict[int, _Tracked] = {}  # server request id -> the scheduler's request
        self._server_rid: dict[int, int] = {}  # the scheduler's Req.rid -> server request id

    def add(self, item: TokenizedRequest) -> None:
        """Queue a request; UsageError if its prompt leaves no room for a new token."""
        req = self.scheduler.add(item.input_ids, item.sampling)
        self.tracked[item.rid] = _Tracked(req)
        self._server_rid[req.rid] = item.rid

    def abort(self, rid: int) -> bool:
        """Stop request `rid`; False if there is none (finished already, or rejected)."""
        tracked = self.tracked.get(rid)
        if tracked is None:
            return False
        self.scheduler.finish(tracked.req, FinishReason.ABORT)
        self._forget(rid)
        return True

    def step(self) -> list[tuple[int, _Tracked]]:
        """One scheduler step: (server request id, request) for each request with new tokens. Finished
        requests are in the list for the last time."""
        done = []
        for req in self.scheduler.step():
            rid = self._server_rid[req.rid]
            done.append((rid, self.tracked[rid]))
            if req.finished:
                self._forget(rid)
        return done

    def _forget(self, rid: int) -> None:
        tracked = self.tracked.pop(rid)
        del self._server_rid[tracked.req.rid]


class SchedulerWorker:
    """Rank 0: the ZMQ side (requests in, tokens and stats out) and admission checks."""

    def __init__(
        self, requests: RequestTable, addresses: IpcAddresses, max_queue: int, log_interval: float = 0.0
    ) -> None:
        self.requests = requests
        self.scheduler = requests.scheduler
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
        self._stats_due = True
        self._stats_sent_at = 0.0
        self._state_log = StateLog(log_interval)
        self._served = 0  # requests that ran to their end (not aborted by their client), for the last line
        self._now = time.monotonic()  # read once per loop iteration, after its step

    def run(self, parent: int) -> None:
        poller = zmq.Poller()
        poller.register(self._inbox, zmq.POLLIN)
        started = self._now
        while keep_running(parent):
            idle = not poller.poll(self._poll_timeout_ms())
            if not idle:
                self._receive_all()
            # Under tensor parallelism an idle rank 0 still steps (an empty step, which the other ranks
            # replay) each time its poll times out: a rank that died on another node, which this node's
            # launcher cannot see, then fails that step's broadcast, and the server stops at once rather
            # than on its next request.
            busy = self.scheduler.has_work
            if busy or (idle and self.scheduler.leader is not None):
                self._send_outputs(self.requests.step())
                self._stats_due = self._stats_due or busy
            self._now = time.monotonic()
            self._maybe_send_stats()
            self._maybe_log_state(busy)
        if self.scheduler.leader is not None:
            self.scheduler.leader.stop()
        log.info(
            "shutting down: served %s, %s in %.1f s",
            plural(self._served, "request"),
            plural(self.scheduler.stats().tokens_generated, "generated token"),
            time.monotonic() - started,
        )

    def _poll_timeout_ms(self) -> int:
        if self.scheduler.has_work:
            return 0
        if self._stats_due:  # wake up in time to send them (the clock as of the last step is close enough)
            wait = STATS_INTERVAL_S - (self._now - self._stats_sent_at)
            return max(0, min(IDLE_POLL_MS, int(wait * 1000) + 1))
        return IDLE_POLL_MS

    # ---- messages in

    def _receive_all(self) -> None:
        """Apply every message waiting."""
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
                    self.requests.abort(item.rid)
                else:
                    log.error("scheduler: unexpected message %s", type(item).__name__)
            self._stats_due = True

    def _add(self, item: TokenizedRequest) -> None:
        """Queue the request if it passes the admission checks, else reject it."""
        scheduler = self.scheduler
        if len(scheduler.waiting) >= self.max_queue:
            self._reject(
                item.rid,
                503,
                f"the server is at capacity: {plural(len(scheduler.waiting), 'request')} already waiting; "
                "retry later",
                code="queue_full",
            )
            return
        n, m = len(item.input_ids), item.sampling.max_tokens
        if item.max_tokens_explicit and n + m > scheduler.max_seq_len:
            self._reject(
                item.rid,
                400,
                f"the prompt ({plural(n, 'token')}) plus max_tokens ({m}) is {n + m} tokens, more than the "
                f"{scheduler.max_seq_len} this model can hold: shorten the prompt or lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
            return
        try:
            self.requests.add(item)
        except InvalidParameter as exc:
            self._reject(item.rid, 400, str(exc), param=exc.param)
        except UsageError as exc:  # the prompt leaves no room for a new token
            self._reject(item.rid, 400, str(exc), param="messages", code="context_length_exceeded")
            return

    def _reject(
        self, rid: int, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        self._api.send(pack(Rejected(rid, status, message, param, code)))

    # ---- messages out

    def _send_outputs(self, done: list[tuple[int, _Tracked]]) -> None:
        batches: list[list[TokenOutput]] = [[] for _ in self._tokenizers]
        for rid, tracked in done:
            req, start = tracked.req, tracked.sent
            new = req.output_ids[start:]
            tracked.sent = start + len(new)
            logprobs = req.output_logprobs[start:] if req.sampling.logprobs is not None else None
            batches[rid % len(batches)].append(
                TokenOutput(rid, new, logprobs, req.finish_reason, req.prompt_len, req.num_cached)
            )
            if req.finished:
                self._served += 1
        for sock, batch in zip(self._tokenizers, batches, strict=True):
            if batch:
                sock.send(pack(batch))

    def _maybe_send_stats(self) -> None:
        now = self._now
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

    def _maybe_log_state(self, stepped_busy: bool) -> None:
        # A request can arrive and finish between two checks: the step it ran in counts as work too.
        busy = self.scheduler.has_work
        if self._state_log.due(self._now, busy or stepped_busy):
            log.info("%s", self._state_log.line(self._now, self.scheduler.stats(), busy))
