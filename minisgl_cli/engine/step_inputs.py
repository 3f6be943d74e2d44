"""A scheduled Batch -> the device tensors of its step: the ForwardBatch, the page-table writes, the rows
that sample.

Everything is gathered on the host into one int64 tensor and copied to the device once per step, then
split into views: one transfer instead of ten, and nothing here reads device memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

from minisgl_cli.engine.forward_batch import ForwardBatch
from minisgl_cli.engine.kv.allocator import PageAllocator
from minisgl_cli.engine.kv.page_table import PageTable
from minisgl_cli.engine.request import Batch


@dataclass
class StepInputs:
    forward_batch: ForwardBatch
    sample_rows: torch.Tensor | None  # rows of the step's logits that sample a token; None when all do


def prepare_step(
    batch: Batch, allocator: PageAllocator, page_table: PageTable, device: torch.device
) -> StepInputs:
    """Write the slots of the batch's new positions into the page table and build the step's ForwardBatch.

    A request's unmapped positions start at `num_mapped`: usually its new tokens, plus the cached prefix on
    the first step after admission (its slots are the prefix cache's pages).
    """
    input_ids: list[int] = []
    positions: list[int] = []
    out_slots: list[int] = []
    map_rows: list[int] = []
    map_positions: list[int] = []
    map_slots: list[int] = []
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    num_tokens = 0
    for req, n in zip(batch.reqs, batch.extend_lens, strict=True):
        start, end = req.num_computed, req.num_computed + n
        slots = allocator.slots(req.pages, req.num_mapped, end)
        map_rows += [req.row] * len(slots)
        map_positions += range(req.num_mapped, end)
        map_slots += slots
        req.num_mapped = end
        input_ids += req.token_ids[start:end]
        positions += range(start, end)
        out_slots += slots[len(slots) - n :]
        seq_lens.append(end)
        num_tokens += n
        logits_indices.append(num_tokens - 1)
    req_rows = [r.row for r in batch.reqs]
    sample_rows = None if all(batch.samples) else [i for i, s in enumerate(batch.samples) if s]

    parts = (input_ids, positions, out_slots, req_rows, seq_lens, batch.extend_lens, logits_indices,
             map_rows, map_positions, map_slots, sample_rows or [])  # fmt: skip
    host = torch.tensor(list(chain.from_iterable(parts)), dtype=torch.int64)
    # A pageable copy: small, and a persistent pinned buffer belongs to the overlap scheduler.
    views = host.to(device).split([len(p) for p in parts])
    page_table.table[views[7], views[8]] = views[9]
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
