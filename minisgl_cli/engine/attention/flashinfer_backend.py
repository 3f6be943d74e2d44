"""FlashInferBackend: paged attention with FlashInfer's kernels (CUDA, bf16/fp16).

The pool's per-layer [num_slots, H_kv, D] k and v are FlashInfer's "NHD" paged layout viewed as
[num_pages, page_size, H_kv, D]: page g holds slots [g * page_size, (g + 1) * page_size), as the
PageAllocator hands them out. A sequence's page ids are read off its page-table row every `page_size`
positions (slot // page_size).

Per step, `prepare` plans one wrapper, shared by every layer:
  - decode batches (one new token each): under "auto", our Triton kernel (attention/triton_decode.py), which
    on an H200 read ragged batches' K/V at 4.3-4.4 TB/s where FlashInfer's CUDA-graph wrapper read 3.6-3.7
    (14-18% less time), and at batch 1 took 5.6 us a layer against 10.2 (docs/benchmarks.md); without
    Triton, FlashInfer's tensor-core kernel from 4 query heads a KV head, else its CUDA-core kernel;
    "tensor-cores", "cuda-cores" and "triton" pick one;
  - prefill and extend batches: the paged prefill wrapper, causal with queries aligned to the end of each
    sequence's K/V (FA3 on Hopper under "auto", FA2 on request);
  - captured CUDA-graph batch sizes: one CUDA-graph decode wrapper per size, whose index buffers live at
    fixed addresses; `prepare_replay` re-plans it before every replay (planning is host work, outside the
    graph). The Triton kernel's launch shape is fixed per batch size too and reads lengths and page ids
    from device buffers, so a replay only copies new ones into the same buffers.
An FP8 KV cache (--kv-cache-dtype fp8_e4m3) decodes through the Triton kernel, which widens the rows as it
reads them; a prefill step gathers its pages into a bf16/fp16 buffer per layer for FlashInfer's prefill kernel.
Planning reads lengths from the host copies in ForwardBatch; the page ids are gathered on the device from
the page table, so nothing here waits for the GPU.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from minisgl_cli.engine.attention import triton_decode
from minisgl_cli.engine.attention.base import AttentionBackend
from minisgl_cli.engine.forward_batch import ForwardBatch
from minisgl_cli.engine.kernels import flashinfer, have_triton
from minisgl_cli.engine.kv.allocator import PADDING_PAGE
from minisgl_cli.engine.kv.page_table import PageTable
from minisgl_cli.engine.kv.pool import KVPool
from minisgl_cli.engine.layers.fp8 import FP8
from minisgl_cli.errors import MinisglError

# Scratch for split-KV partial results, shared by all wrappers (one runs at a time); FlashInfer
# recommends 128 MB, and long prefills with many heads use more.
WORKSPACE_BYTES = 256 << 20
PREFILL_KERNELS = ("auto", "fa2", "fa3")
DECODE_KERNELS = ("auto", "tensor-cores", "cuda-cores", "triton")
# Without Triton, "auto" decodes on FlashInfer's tensor cores from this many query heads per KV head (the
# group then fills the MMA tiles; SGLang's rule), else on its CUDA cores.
TENSOR_CORE_MIN_GROUP = 4


def fp8_decode_refusal(decode_kernel: str) -> str | None:
    """Why an FP8 KV cache cannot decode with `decode_kernel` (None: it can). FlashInfer's FP8 decode
    variants are not in the prebuilt set (each would JIT-compile for minutes); the Triton kernel widens FP8
    rows as it reads them."""
    if decode_kernel in ("auto", "triton") and have_triton():
        return None
    return (
        f"--kv-cache-dtype fp8_e4m3 decodes with the Triton kernel: use --decode-kernel auto or triton, not "
        f"{decode_kernel}" + ("" if have_triton() else " (and install triton)")
    )


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
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(kv_pool, page_table, num_heads=num_heads, head_dim=head_dim)
        fi = flashinfer()
        if fi is None:
            raise MinisglError(
                "the flashinfer attention backend needs FlashInfer and a CUDA GPU: install minisgl[gpu], "
                "or use --attention-backend torch"
            )
        dtype = kv_pool.dtype if dtype is None else dtype
        if dtype not in (torch.bfloat16, torch.float16) or kv_pool.dtype not in (dtype, FP8):
            raise MinisglError(
                f"the flashinfer attention backend runs bfloat16 or float16 (K/V also FP8), not {dtype} "
                f"with a {kv_pool.dtype} KV cache: use --dtype bfloat16, or --attention-backend torch"
            )
        if prefill_kernel not in PREFILL_KERNELS:
            raise MinisglError(f"unknown FlashInfer prefill kernel {prefill_kernel!r}")
        if decode_kernel not in DECODE_KERNELS:
            raise MinisglError(f"unknown FlashInfer decode kernel {decode_kernel!r}")
        group = num_heads // kv_pool.num_kv_heads
        if decode_kernel == "auto":
            fallback = "tensor-cores" if group >= TENSOR_CORE_MIN_GROUP else "cuda-cores"
            decode_kernel = "triton" if have_triton() else fallback
        if decode_kernel == "triton" and not have_triton():
            raise MinisglError("--decode-kernel triton needs the triton package")
        self.fp8_kv = kv_pool.dtype == FP8
        if self.fp8_kv and decode_kernel != "triton":
            raise MinisglError(fp8_decode_refusal(decode_kernel))
        self.decode_kernel = decode_kernel
        self.tensor_cores = decode_kernel == "tensor-cores"
        self._fi = fi
        self.page_size = page_size
        self.num_kv_heads = kv_pool.num_kv_heads
        # What every plan() call repeats: the problem's shape (positional in both wrappers) and dtypes.
        self._dims = (num_heads, self.num_kv_heads, head_dim, page_size)
        # An FP8 pool's prefill reads bf16/fp16 copies of the step's pages (`_widened`), so both are `dtype`.
        self.dtype = dtype
        self._types = {"sm_scale": self.scale, "q_data_type": dtype, "kv_data_type": dtype}
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
        self._active: object | None = self.decode_wrapper  # None: the Triton decode kernel
        self.out_slots = torch.empty(0, dtype=torch.int64, device=self.device)
        # Triton decode: one plan per batch size met, and the step's (plan, device indptr, page ids).
        self._triton_plans: dict[int, triton_decode.DecodePlan] = {}
        self._graph_indptr: dict[int, torch.Tensor] = {}
        self._triton: tuple[triton_decode.DecodePlan, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._last_len: torch.Tensor | None = None  # [B] on the device, read with pages above 1 slot
        self._fp8_pages: torch.Tensor | None = None  # an FP8 prefill step's page ids [total], int64

    # ---- per step

    def prepare(self, batch: ForwardBatch) -> None:
        self.out_slots = batch.out_slots
        indptr, indices, last_len = self._pages(batch)
        if batch.is_decode:
            if self.decode_kernel == "triton":
                plan = self._triton_plan(batch.batch_size)
                dev = _triton_meta(indptr, last_len).to(self.device, non_blocking=True)
                self._use_triton(plan, dev[0], indices, dev[1, :-1], dev[2, :-1])
                return
            self._plan_decode(self.decode_wrapper, indptr, indices, last_len)
            self._active = self.decode_wrapper
            return
        qo_indptr = torch.tensor([0, *accumulate(batch.extend_lens_cpu)], dtype=torch.int32)
        if self.fp8_kv:
            # The prefill kernel reads the step's pages widened into a buffer of their own, in order.
            self._fp8_pages = indices.long()
            indices = torch.arange(indices.numel(), dtype=torch.int32, device=self.device)
        self.prefill_wrapper.plan(
            qo_indptr, indptr, indices, last_len, *self._dims, causal=True, **self._types
        )
        self._active = self.prefill_wrapper

    def attend(self, q: torch.Tensor, layer_id: int) -> torch.Tensor:
        if self._active is None:  # the Triton decode kernel
            assert self._triton is not None
            plan, indptr, indices, order = self._triton
            k, v = self.kv_pool.k(layer_id), self.kv_pool.v(layer_id)
            q = q.reshape(-1, self.num_heads, self.head_dim)
            out = torch.empty_like(q)
            return plan.decode(q, k, v, indptr, indices, self.scale, out, self._last_len, order)
        shape = (-1, self.page_size, self.num_kv_heads, self.head_dim)
        kv = (self.kv_pool.k(layer_id).view(shape), self.kv_pool.v(layer_id).view(shape))
        if self.fp8_kv:
            kv = (self._widened(kv[0]), self._widened(kv[1]))
        return self._active.run(q.contiguous(), kv)  # type: ignore[attr-defined]

    def _widened(self, pages: torch.Tensor) -> torch.Tensor:
        """The step's pages of an FP8 cache, gathered and widened to the activation dtype: FlashInfer's FP8
        prefill variants are not prebuilt, and the copy (a few MB a layer) is small beside a prefill's
        GEMMs. The gather goes through the bytes: FP8 tensors have no indexing kernels."""
        assert self._fp8_pages is not None
        return pages.view(torch.uint8)[self._fp8_pages].view(FP8).to(self.dtype)

    # ---- CUDA graphs

    def init_graphs(self, batch_sizes: list[int], max_context_len: int) -> None:
        """Make a CUDA-graph decode wrapper for each batch size, all sharing one page-id buffer large enough
        for every sequence of the largest batch at full context (shared prefix pages count once per user)."""
        max_bs = max(batch_sizes)
        pages_per_seq = -(-max_context_len // self.page_size)
        self._graph_indices = torch.zeros(max_bs * pages_per_seq, dtype=torch.int32, device=self.device)
        if self.decode_kernel == "triton":
            for bs in batch_sizes:
                self._graph_indptr[bs] = torch.zeros(3, bs + 1, dtype=torch.int32, device=self.device)
            return
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
        indptr = torch.arange(batch_size + 1, dtype=torch.int32)
        indices = torch.full((batch_size,), PADDING_PAGE, dtype=torch.int32, device=self.device)
        self.out_slots = out_slots
        if self.decode_kernel == "triton":
            self._replay_triton(batch_size, indptr, indices, torch.ones(batch_size, dtype=torch.int32))
            return
        wrapper = self._graph_wrappers[batch_size]
        self._plan_decode(wrapper, indptr, indices, torch.ones(batch_size, dtype=torch.int32))
        self._active = wrapper

    def prepare_replay(self, batch: ForwardBatch, batch_size: int, out_slots: torch.Tensor) -> None:
        """Plan the graph wrapper of `batch_size` (>= the batch's size) for `batch`; the padding sequences
        each read one slot of the padding page."""
        indptr, indices, last_len = self._pages(batch)
        pad = batch_size - batch.batch_size
        if pad:
            indptr = torch.cat([indptr, indptr[-1] + torch.arange(1, pad + 1, dtype=torch.int32)])
            indices = torch.cat([indices, indices.new_full((pad,), PADDING_PAGE)])
            last_len = torch.cat([last_len, torch.ones(pad, dtype=torch.int32)])
        self.out_slots = out_slots
        if self.decode_kernel == "triton":
            self._replay_triton(batch_size, indptr, indices, last_len)
            return
        wrapper = self._graph_wrappers[batch_size]
        self._plan_decode(wrapper, indptr, indices, last_len)
        self._active = wrapper

    # ---- helpers

    def _triton_plan(self, batch_size: int) -> triton_decode.DecodePlan:
        """The Triton launch shape for `batch_size` sequences, made once per batch size (the scratch comes
        with it). The split count depends on the batch size alone, not on the lengths: an eager step and a
        graph replay of the same batch then add up the same partial sums, so graphs never change tokens."""
        if batch_size not in self._triton_plans:
            self._triton_plans[batch_size] = triton_decode.plan(
                batch_size,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                triton_decode.MAX_SPLITS * triton_decode.BLOCK_N,
                device=self.device,
                page_size=self.page_size,
                use_dot=True,
            )
        return self._triton_plans[batch_size]

    def _replay_triton(
        self, batch_size: int, indptr: torch.Tensor, indices: torch.Tensor, last_len: torch.Tensor
    ) -> None:
        """Write this step's indptr, last-page lengths and page ids into the fixed buffers the captured
        kernels of `batch_size` read (the copies run on the stream, before the replay)."""
        assert self._graph_indices is not None
        fixed = self._graph_indptr[batch_size]
        fixed.copy_(_triton_meta(indptr, last_len), non_blocking=True)
        self._graph_indices[: indices.numel()].copy_(indices)
        plan = self._triton_plan(batch_size)
        self._use_triton(plan, fixed[0], self._graph_indices, fixed[1, :-1], fixed[2, :-1])

    def _use_triton(
        self,
        plan: triton_decode.DecodePlan,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        last_len: torch.Tensor,
        order: torch.Tensor,
    ) -> None:
        """Make the Triton kernel the step's decode attention, over these device index arrays."""
        self._triton = (plan, indptr, indices, order)
        self._last_len = last_len if self.page_size > 1 else None
        self._active = None

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


def _triton_meta(indptr: torch.Tensor, last_len: torch.Tensor) -> torch.Tensor:
    """What the Triton decode kernel reads besides the page ids, as one int32 [3, B + 1] host tensor (one
    copy to the device): indptr, the last pages' lengths, and the sequences by page count, most first (the
    kernel starts their programs in that order); the last two padded by one entry."""
    order = torch.argsort(indptr[1:] - indptr[:-1], descending=True, stable=True).to(torch.int32)
    pad = last_len.new_zeros(1)
    return torch.stack([indptr, torch.cat([last_len, pad]), torch.cat([order, pad])])
