"""PageTable: for each running request, the KV slot of every position of its sequence."""

from __future__ import annotations

import torch


class PageTable:
    """A [max_running_requests, max_context_len] int64 device tensor: `table[row, pos]` is the KV slot
    holding position `pos` of the request that owns `row`.

    Rows are handed out and taken back here; the scheduler writes the slots of new tokens into its
    row before a step, and attention backends read them. Unused entries stay 0, the padding slot.
    """

    def __init__(self, max_running_requests: int, max_context_len: int, *, device: torch.device) -> None:
        self.max_running_requests = max_running_requests
        self.max_context_len = max_context_len
        self.table = torch.zeros((max_running_requests, max_context_len), dtype=torch.int64, device=device)
        # Popped from the end, so row 0 is handed out first (easier to read in tests and dumps).
        self._free_rows = list(range(max_running_requests - 1, -1, -1))

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def alloc_row(self) -> int:
        """A free row. The scheduler admits at most max_running_requests, so running out is a bug."""
        if not self._free_rows:
            raise RuntimeError(f"all {self.max_running_requests} page-table rows are in use")
        return self._free_rows.pop()

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Record `slots` [n] as the slots of positions [start, start + n) of `row`."""
        self.table[row, start : start + slots.shape[0]] = slots.to(self.table.device)
