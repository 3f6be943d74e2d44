"""KV pool, page table, page allocator, and the ModelRunner's pool sizing."""

from __future__ import annotations

import pytest
import torch

from minisgl_cli.engine.device import resolve_device, resolve_dtype
from minisgl_cli.engine.kv.allocator import PADDING_PAGE, PageAllocator
from minisgl_cli.engine.kv.page_table import PageTable
from minisgl_cli.engine.kv.pool import PADDING_SLOT, KVPool
from minisgl_cli.engine.model_runner import ModelRunner
from minisgl_cli.engine.models.config import ModelConfig
from minisgl_cli.errors import MinisglError, UsageError


def test_allocator_accounting_and_exhaustion() -> None:
    alloc = PageAllocator(num_pages=6, page_size=4)
    assert alloc.num_free == alloc.num_usable == 5  # page 0 is the padding page
    a = alloc.alloc(2)
    b = alloc.alloc(3)
    assert a is not None and b is not None
    assert PADDING_PAGE not in a + b and sorted(a + b) == [1, 2, 3, 4, 5]
    assert alloc.num_free == 0
    assert alloc.alloc(1) is None and alloc.num_free == 0
    alloc.free(a)
    assert alloc.num_free == 2
    assert alloc.alloc(3) is None and alloc.num_free == 2  # a failed alloc takes nothing
    assert alloc.alloc(0) == []
    c = alloc.alloc(2)
    assert c is not None and sorted(c) == sorted(a)
    alloc.free(b)
    alloc.free(c)
    assert alloc.num_free == 5


def test_allocator_pages_needed_and_slot_formula() -> None:
    alloc = PageAllocator(num_pages=10, page_size=4)
    assert [alloc.pages_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    pages = [7, 3, 9]
    # slot of position p = pages[p // 4] * 4 + p % 4, by hand:
    assert alloc.slots(pages, 0, 12) == [28, 29, 30, 31, 12, 13, 14, 15, 36, 37, 38, 39]
    assert alloc.slots(pages, 3, 6) == [31, 12, 13]
    assert alloc.slots(pages, 5, 5) == []
    assert PageAllocator(num_pages=5, page_size=1).slots([4, 2, 3], 0, 3) == [4, 2, 3]


def test_page_table_rows() -> None:
    table = PageTable(max_running_requests=3, max_context_len=8, device=torch.device("cpu"))
    assert table.table.shape == (3, 8) and table.table.dtype == torch.int64
    rows = [table.alloc_row() for _ in range(3)]
    assert sorted(rows) == [0, 1, 2] and table.num_free_rows == 0
    with pytest.raises(RuntimeError):
        table.alloc_row()
    table.free_row(rows[1])
    assert table.alloc_row() == rows[1]
    table.write(rows[2], 2, torch.tensor([11, 12, 13]))
    assert table.table[rows[2]].tolist() == [0, 0, 11, 12, 13, 0, 0, 0]


def test_kv_pool_store_and_padding_slot() -> None:
    pool = KVPool(
        num_layers=2,
        num_slots=10,
        num_kv_heads=2,
        head_dim=4,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    assert (pool.k(0)[PADDING_SLOT] == 0).all() and (pool.v(1)[PADDING_SLOT] == 0).all()
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    pool.store(1, torch.tensor([7, 2, 5]), k, v)
    torch.testing.assert_close(pool.k(1)[[7, 2, 5]], k)
    torch.testing.assert_close(pool.v(1)[[7, 2, 5]], v)
    assert (
        KVPool.bytes_per_token(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.bfloat16)
        == 2 * 2 * 2 * 4 * 2
    )


def test_resolve_device_and_dtype() -> None:
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(UsageError):
        resolve_dtype("int8", cpu)
    with pytest.raises(UsageError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(MinisglError, match="no CUDA"):
            resolve_device("cuda:0")


_TINY = ModelConfig.from_hf(
    {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
)


def _runner(**kw: object) -> ModelRunner:
    args: dict = {
        "dtype": torch.float32,
        "device": torch.device("cpu"),
        "page_size": 4,
        "max_running_requests": 4,
        "max_context_len": 64,
        "kv_cache_tokens": None,
        "kv_cache_gb": None,
        "mem_fraction": 0.9,
    }
    return ModelRunner(_TINY, None, **{**args, **kw})


def test_runner_sizes_pool_from_tokens_gib_or_default() -> None:
    per_token = KVPool.bytes_per_token(2, 2, 8, torch.float32)  # 256 bytes
    r = _runner(kv_cache_tokens=103)
    assert r.num_pages == 25 and r.allocator.num_free == 24  # 103 // 4, minus the padding page
    assert r.kv_pool.num_slots == 100 and r.kv_pool.k(1).shape == (100, 2, 8)
    assert r.page_table.table.shape == (4, 64)
    r = _runner(kv_cache_gb=1 / 1024)  # 1 MiB
    assert r.num_pages == (1 << 20) // per_token // 4
    r = _runner(page_size=1)
    assert r.num_pages == 65536  # CPU default: min(65536 tokens, 4 GiB)


def test_runner_rejects_pool_smaller_than_a_page_per_request() -> None:
    with pytest.raises(MinisglError, match="fewer than one page for each of the 4 running requests"):
        _runner(kv_cache_tokens=16)  # 4 pages: 3 usable
    assert _runner(kv_cache_tokens=20).allocator.num_free == 4
