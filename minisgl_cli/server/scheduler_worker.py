"""The server's scheduler processes: the engine's Scheduler behind ZMQ, one process per tensor-parallel rank.

Rank 0 (the only rank without tensor parallelism) talks to the rest of the server. Loop: take every message
waiting (new tokenized requests, aborts) without blocking while there is work, or block briefly when idle;
run one scheduler step; send each request's new tokens to the tokenizer worker that owns it (it
detokenizes); now and then send EngineStats to the API (for /metrics). Admission checks that need the
engine's limits (prompt length, context length, queue length) happen here and come back to the API as a
Rejected message.

Ranks 1..N-1 talk only to rank 0. Every rank holds a whole Scheduler replica; each iteration rank 0
broadcasts what it accepted (requests that passed its checks, aborts, in arrival order) and every rank
applies that and steps. The same messages in the same order give the same schedules, and every rank gets the
whole logits, so the replicas sample the same tokens and their model collectives always line up. Rank 0
broadcasts even when idle (an empty list, at least every IDLE_POLL_MS) so the others never wait long in a
collective, and a stop marker when it shuts down.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from minisgl_cli.engine.distributed import TPGroup

# torch loads inside the functions that need it: the launcher imports this module for its entry point.

log = logging.getLogger(__name__)

IDLE_POLL_MS = 200  # how long an idle scheduler waits for messages before checking it should go on
STATS_INTERVAL_S = 0.1  # the API's view of the engine (running, queued, KV use) is at most this old

Accepted = list[TokenizedRequest | AbortRequest]  # what rank 0 passes on to the other ranks, in order


@dataclass(frozen=True)
class Rank:
    """Which tensor-parallel rank a scheduler process is, and where the ranks meet."""

    role: str  # the process's name in readiness reports and logs
    rank: int = 0
    size: int = 1
    init_method: str = ""  # a file:// or tcp:// address; unused at size 1


def scheduler_main(
    cfg: EngineConfig,
    source: ModelSource,
    addresses: IpcAddresses,
    max_queue: int,
    log_level: str,
    rank: Rank,
) -> None:
    """Process entry point (spawned by the launcher, once per rank)."""
    parent = prepare_child(log_level)
    with startup_failures(addresses.ready, rank.role):
        cfg, tp = _join(cfg, rank)
        ranks = RankChannel(rank.size)
        engine = build_engine(cfg, source, tp=tp)
        replica = Replica(engine)
        worker = (
            SchedulerWorker(replica, ranks, addresses, max_queue)
            if rank.rank == 0
            else Follower(replica, ranks)
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
        worker.run(parent)
    except RuntimeError as exc:
        if rank.size == 1:
            raise
        # Most likely another rank died (torch.distributed reports it as a RuntimeError); the launcher
        # watches every rank and stops the server, so one line here is enough (the trace at debug level).
        log.debug("%s stopped", rank.role, exc_info=True)
        log.error("%s stopped: %s", rank.role, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        # Not sys.exit: tearing down a process group whose peer is gone can abort the interpreter.
        logging.shutdown()
        os._exit(1)
    tp.destroy()


def _join(cfg: EngineConfig, rank: Rank) -> tuple[EngineConfig, TPGroup]:
    """Join the other ranks: the engine settings for this rank (rank r runs on cuda:r) and its group."""
    import torch

    from minisgl_cli.engine.device import resolve_device
    from minisgl_cli.engine.distributed import TPGroup, init_tp

    if rank.size == 1:
        return cfg, TPGroup.single()
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank.rank)
        torch.cuda.set_device(device)
        cfg = replace(cfg, device=str(device))
    else:  # the ranks share the cores: more threads than cores each would only make them fight
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rank.size))
    backend = "nccl" if device.type == "cuda" else "gloo"
    return cfg, init_tp(rank.rank, rank.size, rank.init_method, backend, device=device)


class RankChannel:
    """Rank 0's messages to the other ranks: a length, then (if any) the msgpack bytes, broadcast over a
    gloo group of its own. It is on the CPU even when the model's group is NCCL, so waiting on it costs no
    GPU stream, and an idle iteration costs a single small broadcast. Without tensor parallelism it does
    nothing."""

    _STOP = -1

    def __init__(self, size: int) -> None:
        import torch.distributed as dist

        self._group = dist.new_group(backend="gloo") if size > 1 else None

    def send(self, items: Accepted | None) -> None:
        """Rank 0: pass `items` on (None: the ranks stop)."""
        if self._group is None:
            return
        import torch
        import torch.distributed as dist

        data = pack(items) if items else b""
        length = self._STOP if items is None else len(data)
        dist.broadcast(torch.tensor([length], dtype=torch.int64), src=0, group=self._group)
        if data:
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            dist.broadcast(payload, src=0, group=self._group)

    def receive(self) -> Accepted | None:
        """Ranks 1..N-1: the next items from rank 0, waiting for them; None once rank 0 stops."""
        import torch
        import torch.distributed as dist

        length = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(length, src=0, group=self._group)
        n = int(length.item())
        if n == self._STOP:
            return None
        if n == 0:
            return []
        payload = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(payload, src=0, group=self._group)
        return unpack(payload.numpy().tobytes())


@dataclass
class _Tracked:
    req: Req
    sent: int = 0  # generated tokens already sent to the request's tokenizer worker (rank 0 only)


class Replica:
    """A rank's scheduler and its requests by server request id. Every rank applies the same accepted
    messages to its replica in the same order, so all replicas stay identical."""

    def __init__(self, engine: Engine) -> None:
        self.scheduler = engine.scheduler
        self.requests: dict[int, _Tracked] = {}  # server request id -> the scheduler's request
        self._server_rid: dict[int, int] = {}  # the scheduler's Req.rid -> server request id

    def add(self, item: TokenizedRequest) -> None:
        """Queue a request; UsageError if its prompt leaves no room for a new token."""
        req = self.scheduler.add(item.input_ids, item.sampling)
        self.requests[item.rid] = _Tracked(req)
        self._server_rid[req.rid] = item.rid

    def abort(self, rid: int) -> bool:
        """Stop request `rid`; False if there is none (finished already, or rejected)."""
        tracked = self.requests.get(rid)
        if tracked is None:
            return False
        self.scheduler.finish(tracked.req, FinishReason.ABORT)
        self._forget(rid)
        return True

    def apply(self, items: Accepted) -> None:
        for item in items:
            if isinstance(item, TokenizedRequest):
                self.add(item)
            else:
                self.abort(item.rid)

    def step(self) -> list[tuple[int, _Tracked]]:
        """One scheduler step: (server request id, request) for each request with new tokens. Finished
        requests are in the list for the last time."""
        done = []
        for req in self.scheduler.step():
            rid = self._server_rid[req.rid]
            done.append((rid, self.requests[rid]))
            if req.finished:
                self._forget(rid)
        return done

    def _forget(self, rid: int) -> None:
        tracked = self.requests.pop(rid)
        del self._server_rid[tracked.req.rid]


class Follower:
    """Ranks 1..N-1: apply what rank 0 accepted, step when there is work, say nothing to anyone."""

    def __init__(self, replica: Replica, ranks: RankChannel) -> None:
        self.replica = replica
        self._ranks = ranks

    def run(self, parent: int) -> None:
        # SIGTERM is not checked here: the launcher stops rank 0 too, whose stop marker ends this loop
        # between two steps. A dead rank 0 ends it with an error from the broadcast.
        while (items := self._ranks.receive()) is not None:
            self.replica.apply(items)
            if self.replica.scheduler.has_work:
                self.replica.step()


class SchedulerWorker:
    """Rank 0: the ZMQ side (requests in, tokens and stats out), admission checks, and the other ranks'
    messages."""

    def __init__(self, replica: Replica, ranks: RankChannel, addresses: IpcAddresses, max_queue: int) -> None:
        self.replica = replica
        self.scheduler = replica.scheduler
        self.max_queue = max_queue
        self._ranks = ranks
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

    def run(self, parent: int) -> None:
        poller = zmq.Poller()
        poller.register(self._inbox, zmq.POLLIN)
        while keep_running(parent):
            accepted = self._receive_all() if poller.poll(self._poll_timeout_ms()) else []
            self._ranks.send(accepted)
            if self.scheduler.has_work:
                self._send_outputs(self.replica.step())
                self._stats_due = True
            self._maybe_send_stats()
        self._ranks.send(None)

    def _poll_timeout_ms(self) -> int:
        if self.scheduler.has_work:
            return 0
        if self._stats_due:  # wake up in time to send them
            wait = STATS_INTERVAL_S - (time.monotonic() - self._stats_sent_at)
            return max(0, min(IDLE_POLL_MS, int(wait * 1000) + 1))
        return IDLE_POLL_MS

    # ---- messages in

    def _receive_all(self) -> Accepted:
        """Apply every message waiting; what was accepted, in order, for the other ranks."""
        accepted: Accepted = []
        while True:
            try:
                data = self._inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return accepted
            message = unpack(data)
            for item in message if isinstance(message, list) else [message]:
                if isinstance(item, TokenizedRequest):
                    if self._add(item):
                        accepted.append(item)
                elif isinstance(item, AbortRequest):
                    if self.replica.abort(item.rid):
                        accepted.append(item)
                else:
                    log.error("scheduler: unexpected message %s", type(item).__name__)
            self._stats_due = True

    def _add(self, item: TokenizedRequest) -> bool:
        """Queue the request if it passes the admission checks, else reject it; whether it was queued."""
        scheduler = self.scheduler
        if len(scheduler.waiting) >= self.max_queue:
            self._reject(
                item.rid,
                503,
                f"the server is at capacity: {len(scheduler.waiting)} requests are already waiting; retry later",
                code="queue_full",
            )
            return False
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
            return False
        try:
            self.replica.add(item)
        except UsageError as exc:
            self._reject(item.rid, 400, str(exc), param="messages", code="context_length_exceeded")
            return False
        return True

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
        for sock, batch in zip(self._tokenizers, batches, strict=True):
            if batch:
                sock.send(pack(batch))

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
