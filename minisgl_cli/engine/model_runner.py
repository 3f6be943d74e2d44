"""ModelRunner: owns the model, its KV pool, page table and page allocator, and runs one step."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from minisgl_cli.engine.attention import create_backend
from minisgl_cli.engine.attention.flashinfer_backend import FlashInferBackend
from minisgl_cli.engine.attention.split_backend import SplitBackend
from minisgl_cli.engine.device import free_device_memory, kv_cache_tokens
from minisgl_cli.engine.distributed import TPGroup
from minisgl_cli.engine.forward_batch import ForwardBatch
from minisgl_cli.engine.graphs import CudaGraphRunner
from minisgl_cli.engine.kv.allocator import PageAllocator
from minisgl_cli.engine.kv.page_table import PageTable
from minisgl_cli.engine.kv.pool import KVPool
from minisgl_cli.engine.layers.fp8 import quantize_linears
from minisgl_cli.engine.layers.moe import fused as moe_fused
from minisgl_cli.engine.models.config import ModelConfig
from minisgl_cli.engine.models.registry import build_model, count_parameters
from minisgl_cli.engine.models.weights import init_dummy_weights, load_weights
from minisgl_cli.errors import MinisglError, UsageError
from minisgl_cli.wording import plural

log = logging.getLogger(__name__)

_GIB = 1 << 30


class ModelRunner:
    """Builds everything a forward step needs, sized once at start-up.

    The pool has `num_pages` pages of `page_size` slots; page 0 is reserved for padding, so the
    allocator hands out `num_pages - 1`. `weights_dir` None means seeded dummy weights. Under tensor
    parallelism (`tp`; one rank, the whole model, by default) it holds rank `tp.rank`'s share of the
    weights and of the KV heads; every rank runs every step and gets the whole logits.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        weights_dir: Path | None,
        *,
        dtype: torch.dtype,
        device: torch.device,
        page_size: int,
        max_running_requests: int,
        max_context_len: int,
        kv_cache_tokens: int | None,
        kv_cache_gb: float | None,
        mem_fraction: float,
        attention_backend: str = "torch",
        prefill_kernel: str = "auto",
        decode_kernel: str = "auto",
        cuda_graph_max_bs: int = 0,
        random_seed: int = 0,
        tp: TPGroup | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.model_config = model_config
        self.tp = tp or TPGroup.single()
        self.rank_config = model_config.for_rank(self.tp)  # the head counts this rank's pool holds
        self.dtype = dtype
        self.kv_dtype = kv_dtype(kv_cache_dtype, dtype)
        self.device = device
        self.page_size = page_size
        torch.manual_seed(random_seed)

        self._check_weights_fit(max_context_len)
        self.model = build_model(model_config, max_context_len, dtype=dtype, device=device, tp=self.tp)
        if weights_dir is None:
            init_dummy_weights(self.model, random_seed)
        else:
            load_weights(self.model, weights_dir)
        if model_config.quantization == "fp8":
            count = quantize_linears(self.model)
            log.info("fp8: %d linears quantized (a scale per output row); embedding, LM head, router and "
                     "experts stay %s", count, str(dtype).removeprefix("torch."))  # fmt: skip

        # Every rank takes the smallest rank's pool: ranks size from their own free memory, and schedulers
        # that saw different page counts would admit and preempt differently, so their collectives would
        # stop matching.
        self.num_pages = self.tp.min_over_ranks(
            self._size_pool(kv_cache_tokens, kv_cache_gb, mem_fraction, max_running_requests)
        )
        self.kv_pool = KVPool(
            model_config.num_layers,
            self.num_pages * page_size,
            self.rank_config.num_kv_heads,
            model_config.head_dim,
            dtype=self.kv_dtype,
            device=device,
        )
        self.page_table = PageTable(max_running_requests, max_context_len, device=device)
        self.allocator = PageAllocator(self.num_pages, page_size)
        self.attn = create_backend(
            attention_backend,
            kv_pool=self.kv_pool,
            page_table=self.page_table,
            num_heads=self.rank_config.num_heads,
            head_dim=model_config.head_dim,
            page_size=page_size,
            prefill_kernel=prefill_kernel,
            decode_kernel=decode_kernel,
            dtype=dtype,
        )
        self.graphs = self._capture_graphs(min(cuda_graph_max_bs, max_running_requests), max_context_len)
        if device.type == "cuda":
            # The sampler's Triton kernel compiles on first use: here, not inside the first sampled step
            # (a second's stall of every request, and of any benchmark whose warm-up is greedy).
            from minisgl_cli.engine.fused_sampling import warm_up

            warm_up(model_config.vocab_size, dtype, device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B, vocab] of each sequence's last new token, in the model's dtype."""
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch)
        self.attn.prepare(batch)
        return self.model(batch, self.attn)

    def _capture_graphs(self, max_batch_size: int, max_context_len: int) -> CudaGraphRunner | None:
        """Decode graphs, after the KV pool so they see its final addresses; None where they cannot run
        (CPU, graphs turned off, a decode backend other than FlashInfer, whose planning is not capturable,
        collectives over gloo)."""
        decode = self.attn.decode_backend if isinstance(self.attn, SplitBackend) else self.attn
        if self.device.type != "cuda" or max_batch_size <= 0 or not isinstance(decode, FlashInferBackend):
            return None
        if not self.tp.capturable:  # ranks on one GPU over gloo (tp_ranks.ONE_GPU_ENV): run eagerly
            return None
        if self.model_config.moe is not None and not moe_fused(
            torch.empty(1, 1, dtype=self.dtype, device=self.device)
        ):
            # The MoE block's torch path reads each expert's token count on the host (layers/moe.py), which a
            # graph cannot capture; only its fused kernels (layers/fused_moe.py, Triton) replay.
            log.info(
                "mixture-of-experts model without Triton's fused kernels: decode runs without CUDA graphs"
            )
            return None
        return CudaGraphRunner(
            self.model, decode, max_batch_size=max_batch_size, max_context_len=max_context_len
        )

    def _check_weights_fit(self, max_context_len: int) -> None:
        free = free_device_memory(self.device)
        if free is None:
            return
        # Counting on the meta device allocates nothing, so a model too big fails here with a clear
        # sentence instead of an out-of-memory error halfway through loading.
        meta = build_model(
            self.model_config, max_context_len, dtype=self.dtype, device=torch.device("meta"), tp=self.tp
        )
        need = count_parameters(meta) * self.dtype.itemsize
        if need > free:
            raise MinisglError(
                f"the model's weights need {need / _GIB:.1f} GiB but only {free / _GIB:.1f} GiB is free on "
                f"{self.device}: use a smaller model or another device"
            )

    def _size_pool(
        self, tokens: int | None, gib: float | None, mem_fraction: float, max_running_requests: int
    ) -> int:
        cfg = self.rank_config
        per_token = KVPool.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype)
        num_tokens = kv_cache_tokens(
            device=self.device,
            bytes_per_token=per_token,
            kv_cache_tokens=tokens,
            kv_cache_gb=gib,
            mem_fraction=mem_fraction,
        )
        free = free_device_memory(self.device)
        if free is not None and num_tokens * per_token > free:
            raise MinisglError(
                f"a KV cache of {num_tokens} tokens needs {num_tokens * per_token / _GIB:.1f} GiB but only "
                f"{free / _GIB:.1f} GiB is free on {self.device}: ask for less (--kv-cache-tokens / --kv-cache-gb)"
            )
        num_pages = num_tokens // self.page_size
        # One page per running request is the least that lets every admitted request make progress;
        # the extra page is the reserved padding page.
        if num_pages < max_running_requests + 1:
            raise MinisglError(
                f"the KV cache holds {num_tokens} tokens ({plural(max(num_pages - 1, 0), 'usable page')} of "
                f"{self.page_size}), fewer than one page for each of the {max_running_requests} running "
                "requests: give it more memory (--kv-cache-tokens / --kv-cache-gb / --mem-fraction) "
                "or lower --max-running-requests"
            )
        return num_pages


def kv_dtype(setting: str, model_dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype: "auto" stores K/V in the model's dtype, "fp8_e4m3" in float8_e4m3fn."""
    if setting == "auto":
        return model_dtype
    if setting == "fp8_e4m3":
        return torch.float8_e4m3fn
    raise UsageError(f"--kv-cache-dtype must be auto or fp8_e4m3, not {setting!r}")
