"""Keeping the tensor-parallel ranks' schedulers identical.

Every rank holds a whole Scheduler and runs every step, because each step's forward has collectives that all
ranks must enter with the same batch. Only rank 0 sees requests (the server's ZMQ side, or the in-process
LLM's caller). So rank 0's scheduler records each change made to it from outside (a request added, one
finished early, the prefix cache dropped) and, at the start of each step, sends the changes since the last
step to the other ranks, which apply them and run the same step. The same changes in the same order give
the same schedule; every rank gets the whole logits and the same seeds, so the replicas also sample the same
tokens, and no sampled id needs to travel between ranks.

The changes go over the group's gloo CPU group (never a GPU stream): a length, then the pickled list. The
ranks trust each other (they are the same program, started together), so pickle is safe here.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from minisgl_cli.engine.request import Req, SamplingParams

if TYPE_CHECKING:
    from minisgl_cli.engine.distributed import TPGroup
    from minisgl_cli.engine.scheduler import Scheduler


@dataclass(frozen=True)
class Added:
    rid: int  # the id rank 0's scheduler gave it; the others give the same, as they add in the same order
    prompt_ids: list[int]
    sampling: SamplingParams


@dataclass(frozen=True)
class Finished:
    rid: int
    reason: str


@dataclass(frozen=True)
class CacheDropped:
    pass


@dataclass(frozen=True)
class GrammarReady:
    """Rank 0's request `rid` leaves `compiling` for the queue now (its grammar compiled on rank 0)."""

    rid: int


Change = Added | Finished | CacheDropped | GrammarReady

_STOP = -1  # the length that tells the other ranks that rank 0 has stopped


class RankChannel:
    """Rank 0's changes to the other ranks, broadcast over the CPU group."""

    def __init__(self, tp: TPGroup) -> None:
        if tp.size == 1 or tp.cpu_group is None:
            raise ValueError("a rank channel needs a tensor-parallel group of two or more ranks")
        self._group = tp.cpu_group

    def send(self, changes: list[Change] | None) -> None:
        """Rank 0: pass `changes` on (None: the other ranks stop)."""
        data = pickle.dumps(changes) if changes else b""
        length = _STOP if changes is None else len(data)
        dist.broadcast(torch.tensor([length], dtype=torch.int64), src=0, group=self._group)
        if data:
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=self._group)

    def receive(self) -> list[Change] | None:
        """Ranks 1..N-1: rank 0's next changes, waiting for them; None once rank 0 stops."""
        length = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(length, src=0, group=self._group)
        n = int(length.item())
        if n == _STOP:
            return None
        if n == 0:
            return []
        payload = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(payload, src=0, group=self._group)
        return pickle.loads(payload.numpy().tobytes())


class RankLeader:
    """Rank 0's log of changes not yet sent; its Scheduler records into it and flushes it each step."""

    def __init__(self, channel: RankChannel) -> None:
        self._channel = channel
        self._pending: list[Change] = []
        self._stopped = False

    def record(self, change: Change) -> None:
        self._pending.append(change)

    def flush(self) -> None:
        """Send what changed since the last step; the other ranks then run the step rank 0 is about to."""
        changes, self._pending = self._pending, []
        self._channel.send(changes)

    def stop(self) -> None:
        """Tell the other ranks to leave their loops (once; later calls do nothing)."""
        if not self._stopped:
            self._stopped = True
            self._channel.send(None)


def follow(scheduler: Scheduler, channel: RankChannel) -> None:
    """Ranks 1..N-1: apply rank 0's changes and run the step it runs, until rank 0 stops. A dead rank 0
    ends this with a RuntimeError from the broadcast."""
    live: dict[int, Req] = {}
    scheduler.follows = True
    while (changes := channel.receive()) is not None:
        for change in changes:
            if isinstance(change, Added):
                req = scheduler.add(change.prompt_ids, change.sampling)
                if req.rid != change.rid:
                    raise RuntimeError(f"rank out of step: request {change.rid} became {req.rid} here")
                live[req.rid] = req
            elif isinstance(change, Finished):
                if (req := live.pop(change.rid, None)) is not None:
                    scheduler.finish(req, change.reason)
            elif isinstance(change, GrammarReady):
                scheduler.grammar_ready(live[change.rid])  # waits for this rank's own compile of it
            else:
                scheduler.drop_cached_prefixes()
        # Rank 0 sends exactly once per step, just before it: so there is a step to run here too.
        for req in scheduler.step():
            if req.finished:
                live.pop(req.rid, None)
