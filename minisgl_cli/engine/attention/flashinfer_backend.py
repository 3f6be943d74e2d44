"""FlashInferBackend: paged attention with FlashInfer's kernels (CUDA, bf16/fp16).

The pool's per-layer [num_slots, H_kv, D] k and v are FlashInfer's "NHD" paged layout viewed as
[num_pages, page_size, H_kv, D]: page g holds slots [g * page_size, (g + 1) * page_size), as the
PageAllocator hands them out. A sequence's page ids are read off its page-table row every `page_size`
positions (slot // page_size).

Per step, `prepare` plans one wrapper, shared by every layer:
  - decode batches (one new token each): the decode wrapper, on tensor cores when a KV head serves at least
    4 query heads (the group then fills the MMA tiles; SGLang's rule), else the CUDA-core kernel;
  - prefill and extend batches: the paged prefill wrapper, causal with queries aligned to the end of each
    sequence's K/V (FA3 on Hopper under "auto", FA2 on request);
  - captured CUDA-graph batch sizes: one CUDA-graph decode wrapper per size, whose index buffers live at
    fixed addresses; `prepare_replay` re-plans it before every replay (planning is host work, outside the
    graph).
Planning reads lengths from the host copies in ForwardBatch; the page ids are gathered on the device from
the page table, so nothing here waits for the GPU.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from minisgl_cli.engine.attention.base import AttentionBackend
from minisgl_cli.engine.forward_batch import ForwardBatch
from minisgl_cli.engine.kernels import flashinfer
from minisgl_cli.engine.kv.allocator import PADDING_PAGE
from minisgl_cli.engine.kv.page_table import PageTable
from minisgl_cli.engine.kv.pool import KVPool
from minisgl_cli.errors import MinisglError

# Scratch for split-KV partial results, shared by all wrappers (one runs at a time); FlashInfer
# recommends 128 MB, and long prefills with many heads use more.
WORKSPACE_BYTES = 256 << 20
PREFILL_KERNELS = ("auto", "fa2", "fa3")
DECODE_KERNELS = ("auto", "tensor-cores", "cuda-cores")
# Query heads per KV head from which "auto" decodes on tensor cores.
TENSOR_CORE_MIN_GROUP = 4


class FlashInferBackend(AttentionBackend):
    def __init__(
        self,
        kv_pool: KVPool,
        page_table: PageTable,
        *,
        num_heads: int,
        head_dim: int,
        page_size: int,
        prefill_kernel: str = "auto",
        decode_kernel: str = "auto",
    ) -> None:
        super().__init__(kv_pool, page_table, num_heads=num_heads, head_dim=head_dim)
        fi = flashinfer()
        if fi is None:
            raise MinisglError(
                "the flashinfer attention backend needs FlashInfer and a CUDA GPU: install minisgl[gpu], "
                "or use --attention-backend torch"
            )
        if kv_pool.dtype not in (torch.bfloat16, torch.float16):
            raise MinisglError(
                f"the flashinfer attention backend runs bfloat16 or float16, not {kv_pool.dtype}: "
                "use --dtype bfloat16, or --attention-backend torch"
            )
        if prefill_kernel not in PREFILL_KERNELS:
            raise MinisglError(f"unknown FlashInfer prefill kernel {prefill_kernel!r}")
        if decode_kernel not in DECODE_KERNELS:
            raise MinisglError(f"unknown FlashInfer decode kernel {decode_kernel!r}")
        group = num_heads // kv_pool.num_kv_heads
        self.tensor_cores = (
            group >= TENSOR_CORE_MIN_GROUP if decode_kernel == "auto" else decode_kernel == "tensor-cores"
        )
        self._fi = fi
        self.page_size = page_size
        self.num_kv_heads = kv_pool.num_kv_heads
        # What every plan() call repeats: the problem's shape (positional in both wrappers) and dtypes.
        self._dims = (num_heads, self.num_kv_heads, head_dim, page_size)
        self._types = {"sm_scale": self.scale, "q_data_type": kv_pool.dtype, "kv_data_type": kv_pool.dtype}
        self.device = kv_pool.device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.prefill_wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=prefill_kernel
        )
        self.decode_wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.tensor_cores
        )
        self._graph_wrappers: dict[int, object] = {}
        self._graph_indices: torch.Tensor | None = None
        self._active: object = self.decode_wrapper
        self.out_slots = torch.empty(0, dtype=torch.int64, device=self.device)

    # ---- per step

    def prepare(self, batch: ForwardBatch) -> None:
        self.out_slots = batch.out_slots
        indptr, indices, last_len = self._pages(batch)
        if batch.is_decode:
            self._plan_decode(self.decode_wrapper, indptr, indices, last_len)
            self._active = self.decode_wrapper
            return
        qo_indptr = torch.tensor([0, *accumulate(batch.extend_lens_cpu)], dtype=torch.int32)
        self.prefill_wrapper.plan(
            qo_indptr, indptr, indices, last_len, *self._dims, causal=True, **self._types
        )
        self._active = self.prefill_wrapper

    def attend(self, q: torch.Tensor, layer_id: int) -> torch.Tensor:
        shape = (-1, self.page_size, self.num_kv_heads, self.head_dim)
        kv = (self.kv_pool.k(layer_id).view(shape), self.kv_pool.v(layer_id).view(shape))
        return self._active.run(q.contiguous(), kv)  # type: ignore[attr-defined]

    # ---- CUDA graphs

    def init_graphs(self, batch_sizes: list[int], max_context_len: int) -> None:
        """Make a CUDA-graph decode wrapper for each batch size, all sharing one page-id buffer large enough
        for every sequence of the largest batch at full context (shared prefix pages count once per user)."""
        max_bs = max(batch_sizes)
        pages_per_seq = -(-max_context_len // self.page_size)
        self._graph_indices = torch.zeros(max_bs * pages_per_seq, dtype=torch.int32, device=self.device)
        for bs in batch_sizes:
            self._graph_wrappers[bs] = self._fi.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                torch.zeros(bs + 1, dtype=torch.int32, device=self.device),
                self._graph_indices,
                torch.zeros(bs, dtype=torch.int32, device=self.device),
                "NHD",
                use_tensor_cores=self.tensor_cores,
            )

    def prepare_capture(self, batch_size: int, out_slots: torch.Tensor) -> None:
        """Plan the graph wrapper of `batch_size` for capture: every sequence one token on the padding page."""
        wrapper = self._graph_wrappers[batch_size]
        indptr = torch.arange(batch_size + 1, dtype=torch.int32)
        indices = torch.full((batch_size,), PADDING_PAGE, dtype=torch.int32, device=self.device)
        self._plan_decode(wrapper, indptr, indices, torch.ones(batch_size, dtype=torch.int32))
        self._active = wrapper
        self.out_slots = out_slots

    def prepare_replay(self, batch: ForwardBatch, batch_size: int, out_slots: torch.Tensor) -> None:
        """Plan the graph wrapper of `batch_size` (>= the batch's size) for `batch`; the padding sequences
        each read one slot of the padding page."""
        indptr, indices, last_len = self._pages(batch)
        pad = batch_size - batch.batch_size
        if pad:
            indptr = torch.cat([indptr, indptr[-1] + torch.arange(1, pad + 1, dtype=torch.int32)])
            indices = torch.cat([indices, indices.new_full((pad,), PADDING_PAGE)])
            last_len = torch.cat([last_len, torch.ones(pad, dtype=torch.int32)])
        wrapper = self._graph_wrappers[batch_size]
        self._plan_decode(wrapper, indptr, indices, last_len)
        self._active = wrapper
        self.out_slots = out_slots

    # ---- helpers

    def _plan_decode(
        self, wrapper: object, indptr: torch.Tensor, indices: torch.Tensor, last_len: torch.Tensor
    ) -> None:
        wrapper.plan(indptr, indices, last_len, *self._dims, **self._types)  # type: ignore[attr-defined]

    def _pages(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indptr [B + 1] and last_page_len [B] on the host, page ids [total] on the device), int32.

        Sequence i owns entries indptr[i]:indptr[i+1] of the page ids; its page j is the page-table slot at
        position j * page_size, divided by page_size. The gather is vectorised on the device: each entry
        learns its sequence through repeat_interleave (with the total given, so no sync) and its page number
        from its offset to the sequence's first entry.
        """
        ps = self.page_size
        num_pages = [-(-n // ps) for n in batch.seq_lens_cpu]
        indptr_list = [0, *accumulate(num_pages)]
        total = indptr_list[-1]
        indptr = torch.tensor(indptr_list, dtype=torch.int32)
        last_len = torch.tensor(
            [n - (p - 1) * ps for n, p in zip(batch.seq_lens_cpu, num_pages, strict=True)], dtype=torch.int32
        )

        pages_dev = torch.div(batch.seq_lens + (ps - 1), ps, rounding_mode="floor")
        starts = torch.cumsum(pages_dev, 0) - pages_dev
        seq_of = torch.repeat_interleave(
            torch.arange(batch.batch_size, device=self.device), pages_dev, output_size=total
        )
        page_no = torch.arange(total, device=self.device) - starts[seq_of]
        slots = self.page_table.table[batch.req_rows[seq_of], page_no * ps]
        indices = (slots if ps == 1 else torch.div(slots, ps, rounding_mode="floor")).to(torch.int32)
        return indptr, indices, last_len
