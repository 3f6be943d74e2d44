"""Tensor parallelism: a rank's group and collectives, and how a dimension splits over the ranks.

One process per rank; every rank runs the same forward over its share of the weights (Megatron-style) and
the collectives here join the shares. The backend is a parameter (gloo on CPU, nccl on CUDA), so CPU tests
run the very code GPUs run. At one rank there is no process group and every collective is a no-op, so a
single-device run needs no torch.distributed set-up at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """A rank's part [start, start + size) of a dimension that has `full` entries in the unsplit model."""

    start: int
    size: int
    full: int

    def times(self, unit: int) -> Shard:
        """The same part counted in finer units (heads -> rows, at head_dim rows a head)."""
        return Shard(self.start * unit, self.size * unit, self.full * unit)


@dataclass(frozen=True)
class WeightSlice:
    """Where a piece of a rank's parameter comes from: `dest` (a view of the parameter) holds the entries
    `source` of dimension `dim` of the unsplit tensor, which is checkpoint part `part` of a merged
    parameter (q/k/v, gate/up) or, with `part` None, the parameter's own checkpoint tensor."""

    part: str | None
    dim: int
    dest: torch.Tensor
    source: Shard


# The CPU group's timeout: ranks 1..N-1 wait in it for rank 0's next step, however long the engine idles
# (a chat REPL waits on its user). A dead peer still fails a gloo collective at once: its socket closes.
CPU_GROUP_TIMEOUT = timedelta(days=365)


@dataclass(frozen=True)
class TPGroup:
    """A rank's place among the tensor-parallel ranks. `group` carries the model's collectives (NCCL on
    GPUs); `cpu_group` is gloo on every device and carries the ranks' bookkeeping (what rank 0 scheduled,
    the KV pool size), which must not wait on a GPU stream and must fail fast when a peer dies."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None

    @classmethod
    def single(cls) -> TPGroup:
        """One rank holding the whole model: no process group, collectives are no-ops."""
        return cls(rank=0, size=1)

    @property
    def capturable(self) -> bool:
        """Whether a CUDA graph can capture this group's collectives (NCCL's can; gloo's cannot)."""
        return self.size == 1 or dist.get_backend(self.group) == "nccl"

    def shard(self, n: int) -> Shard:
        """This rank's part of `n` items (heads, rows): an equal share when the ranks divide `n`. With
        fewer items than ranks (KV heads under a wide split) each rank holds the one item that its share
        of the query heads uses, so `size // n` ranks hold a copy of each (vLLM's rule)."""
        if n % self.size and self.size % n:
            raise ValueError(f"{n} items split over {self.size} ranks neither evenly nor by replication")
        return Shard(self.rank * n // self.size, max(n // self.size, 1), n)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns `x`."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def min_over_ranks(self, value: int) -> int:
        """The smallest of the ranks' `value`s (every rank must call it)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' `x` side by side along the last dimension, in rank order (vocab-parallel logits)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def destroy(self) -> None:
        """Leave the process group (at shutdown, so peers are not left waiting on a dead socket)."""
        if self.group is not None:
            dist.destroy_process_group()


def init_tp(
    rank: int,
    size: int,
    init_method: str,
    backend: str,
    *,
    device: torch.device | None = None,
    timeout: timedelta = timedelta(minutes=10),
) -> TPGroup:
    """Join the group of `size` ranks as `rank`, meeting the others at `init_method` (a file:// or tcp://
    address). `backend` is "gloo" on CPU and "nccl" on CUDA; give NCCL ranks their `device`. A collective
    that waits on a dead peer fails after `timeout` instead of hanging for ever (long enough for the
    slowest rank to load its weights before the first collective)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside a group of {size}")
    if size == 1:
        return TPGroup.single()
    device_id = device if device is not None and device.type == "cuda" else None
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout, device_id=device_id
    )
    cpu_group = dist.new_group(backend="gloo", timeout=CPU_GROUP_TIMEOUT)
    return TPGroup(rank=rank, size=size, group=dist.group.WORLD, cpu_group=cpu_group)
