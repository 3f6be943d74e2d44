"""CUDA graphs for decode steps: one graph per captured batch size, replayed with the batch padded up.

A decode step of a small model is a few hundred short kernels; launching them one by one from Python costs
more than running them. Each captured graph replays them all in one launch. The graphs read static input
buffers (token ids, positions, KV slots), so a step copies its inputs in, plans the FlashInfer graph wrapper
of its padded size (host work, outside the graph) and replays. Padding rows compute garbage that nobody
reads: their K/V goes to the padding slot and their logits are sliced off.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from minisgl_cli.engine.attention.flashinfer_backend import FlashInferBackend
from minisgl_cli.engine.forward_batch import ForwardBatch
from minisgl_cli.engine.kv.pool import PADDING_SLOT
from minisgl_cli.errors import MinisglError


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch_size (itself included): padding wastes at most
    7 rows past 8, and 36 graphs cover 256."""
    sizes = [s for s in (1, 2, 4) if s < max_batch_size]
    sizes += range(8, max_batch_size, 8)
    return sorted({*sizes, max_batch_size})


class CudaGraphRunner:
    def __init__(
        self, model: nn.Module, attn: FlashInferBackend, *, max_batch_size: int, max_context_len: int
    ) -> None:
        self.model = model
        self.attn = attn
        self.sizes = capture_sizes(max_batch_size)
        self.max_batch_size = max_batch_size
        device = attn.device
        self.input_ids = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.out_slots = torch.full((max_batch_size,), PADDING_SLOT, dtype=torch.int64, device=device)
        self.row_index = torch.arange(max_batch_size, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        attn.init_graphs(self.sizes, max_context_len)
        try:
            self._capture_all()
        except torch.OutOfMemoryError:
            raise MinisglError(
                f"capturing CUDA graphs for decode batches up to {max_batch_size} ran out of GPU memory: lower "
                "--mem-fraction (more room outside the KV cache) or --cuda-graph-max-bs (0 disables graphs)"
            ) from None

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.is_decode and batch.batch_size <= self.max_batch_size

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """The step's logits [B, vocab], by replaying the smallest graph that holds the batch."""
        n = batch.batch_size
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.out_slots[:n].copy_(batch.out_slots)
        if size > n:
            # Stale ids and positions of padding rows are harmless (in range); their K/V writes are not.
            self.out_slots[n:size].fill_(PADDING_SLOT)
        self.attn.prepare_replay(batch, size, self.out_slots[:size])
        self.graphs[size].replay()
        return self.outputs[size][:n]

    def _static_batch(self, size: int) -> ForwardBatch:
        ones = [1] * size
        return ForwardBatch(
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            out_slots=self.out_slots[:size],
            req_rows=self.row_index[:size],
            seq_lens=torch.ones(size, dtype=torch.int64, device=self.input_ids.device),
            extend_lens=torch.ones(size, dtype=torch.int64, device=self.input_ids.device),
            logits_indices=self.row_index[:size],
            seq_lens_cpu=ones,
            extend_lens_cpu=ones,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        # Largest first: the smaller graphs then fit in the memory the largest one's pool already holds.
        for size in reversed(self.sizes):
            batch = self._static_batch(size)
            self.attn.prepare_capture(size, batch.out_slots)
            # One eager run first (on a side stream, as torch asks): kernels load and autotune outside capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.model(batch, self.attn)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model(batch, self.attn)
            self.graphs[size] = graph
        torch.cuda.synchronize()
