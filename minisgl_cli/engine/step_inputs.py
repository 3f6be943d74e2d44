"""A scheduled Batch -> the device tensors of its step: the ForwardBatch, the page-table writes, the rows
that sample.

Everything is gathered on the host into one int64 tensor and copied to the device once per step, from
pinned memory without blocking (engine/host_copy.py), then split into views: one transfer instead of ten,
and nothing here reads device memory. With overlap scheduling, a request's last token may still be in
flight (sampled by the step running on the device): its input id is copied there, device to device, from
that step's sampled ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from minisgl_cli.engine.forward_batch import ForwardBatch
from minisgl_cli.engine.host_copy import to_device
from minisgl_cli.engine.kv.allocator import PageAllocator
from minisgl_cli.engine.kv.page_table import PageTable
from minisgl_cli.engine.request import Batch, Req


@dataclass
class StepInputs:
    forward_batch: ForwardBatch
    sample_rows: torch.Tensor | None  # rows of the step's logits that sample a token; None when all do


def prepare_step(
    batch: Batch,
    allocator: PageAllocator,
    page_table: PageTable,
    device: torch.device,
    prev_ids: torch.Tensor | None = None,
    prev_rows: Sequence[int] = (),
) -> StepInputs:
    """Write the slots of the batch's new positions into the page table and build the step's ForwardBatch.

    A request's unmapped positions start at `num_mapped`: usually its new tokens, plus the cached prefix on
    the first step after admission (its slots are the prefix cache's pages).

    `prev_ids`: the sampled ids [S] (on the device) of the step in flight; `prev_rows[i]`: the row in them of
    the token `batch.reqs[i]` has in flight, or -1. Needed only when some request of the batch has one.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    out_slots: list[int] = []
    map_rows: list[int] = []
    map_positions: list[int] = []
    map_slots: list[int] = []
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    fill_at: list[int] = []  # indices into input_ids that take an in-flight token...
    fill_from: list[int] = []  # ...from these rows of prev_ids
    ps = allocator.page_size
    num_tokens = 0
    for i, (req, n) in enumerate(zip(batch.reqs, batch.extend_lens, strict=True)):
        start, end = req.num_computed, req.num_computed + n
        if n == 1 and req.num_mapped == start:
            # A decode token whose row is mapped up to it (nearly every row of a decode step): one slot, one
            # id, without the general case's slices; this loop is per request per step.
            slot = req.pages[start // ps] * ps + start % ps
            map_rows.append(req.row)
            map_positions.append(start)
            map_slots.append(slot)
            out_slots.append(slot)
            positions.append(start)
            if start < len(req.token_ids):
                input_ids.append(req.token_ids[start])
            else:
                fill_at.append(num_tokens)
                fill_from.append(_inflight_row(req, i, prev_ids, prev_rows))
                input_ids.append(0)
        else:
            slots = allocator.slots(req.pages, req.num_mapped, end)
            map_rows += [req.row] * len(slots)
            map_positions += range(req.num_mapped, end)
            map_slots += slots
            input_ids += req.token_ids[start:end]
            if req.num_inflight and end > req.seq_len:
                # The in-flight token is always the sequence's last, so the chunk's last: a placeholder here,
                # overwritten on the device below.
                fill_at.append(num_tokens + n - 1)
                fill_from.append(_inflight_row(req, i, prev_ids, prev_rows))
                input_ids.append(0)
            positions += range(start, end)
            out_slots += slots[len(slots) - n :]
        req.num_mapped = end
        seq_lens.append(end)
        num_tokens += n
        logits_indices.append(num_tokens - 1)
    req_rows = [r.row for r in batch.reqs]
    sample_rows = None if all(batch.samples) else [i for i, s in enumerate(batch.samples) if s]

    parts = (input_ids, positions, out_slots, req_rows, seq_lens, batch.extend_lens, logits_indices,
             map_rows, map_positions, map_slots, sample_rows or [], fill_at, fill_from)  # fmt: skip
    views = to_device(list(chain.from_iterable(parts)), torch.int64, device).split([len(p) for p in parts])
    page_table.table[views[7], views[8]] = views[9]
    if fill_at:
        assert prev_ids is not None
        views[0].index_copy_(0, views[11], prev_ids.index_select(0, views[12]))
    forward_batch = ForwardBatch(
        input_ids=views[0],
        positions=views[1],
        out_slots=views[2],
        req_rows=views[3],
        seq_lens=views[4],
        extend_lens=views[5],
        logits_indices=views[6],
        seq_lens_cpu=seq_lens,
        extend_lens_cpu=list(batch.extend_lens),
    )
    return StepInputs(forward_batch=forward_batch, sample_rows=None if sample_rows is None else views[10])


def _inflight_row(req: Req, i: int, prev_ids: torch.Tensor | None, prev_rows: Sequence[int]) -> int:
    """The row of the step in flight's sampled ids that holds `req`'s (batch row `i`) last token."""
    if prev_ids is None or not prev_rows or prev_rows[i] < 0:
        raise RuntimeError(f"request {req.rid} feeds a token in flight but no in-flight row was given")
    return prev_rows[i]
