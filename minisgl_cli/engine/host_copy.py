"""Host -> device copies that never block the CPU: the rule every per-step upload follows.

A copy from pageable memory (`tensor.to("cuda")`, `torch.tensor(data, device="cuda")`) makes the CPU wait
until the stream has drained, i.e. until the step already running on the GPU ends, which silently kills
overlap scheduling. A copy from pinned memory with `non_blocking=True` is queued on the stream and returns
at once. PyTorch's caching host allocator keeps a pinned block alive until the copy that reads it has run,
so a fresh pinned tensor per call is safe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence[object], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`values` (numbers or nested lists of them) as a tensor on `device`, without waiting for the device.

    On the CPU the host tensor itself is returned; on a GPU it is built in pinned memory and copied with
    `non_blocking=True`.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
