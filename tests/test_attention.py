"""Attention backends against a float64 dense causal attention computed by hand: torch everywhere,
FlashInfer on a CUDA GPU (head dims 64 and 128, which its prebuilt Hopper kernels cover).

Each sequence's positions live in scattered, non-contiguous KV slots (shuffled pages); the cached
prefix is written into the pool beforehand, the new tokens' k/v come with the step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from minisgl_cli.engine.attention import create_backend, resolve_backend_names
from minisgl_cli.engine.forward_batch import ForwardBatch
from minisgl_cli.engine.kv.page_table import PageTable
from minisgl_cli.engine.kv.pool import KVPool
from minisgl_cli.errors import MinisglError, UsageError

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_LAYERS = 4, 2, 8, 2
CPU = torch.device("cpu")


@dataclass
class Seq:
    seq_len: int  # after the step
    extend_len: int  # new tokens in the step
    k: torch.Tensor  # [seq_len, H_kv, D] of every position, float64
    v: torch.Tensor
    slots: list[int]  # slot of every position
    row: int


def _make_seqs(
    shape: list[tuple[int, int]], page_size: int, seed: int, head_dim: int = HEAD_DIM
) -> tuple[list[Seq], int]:
    rng = random.Random(seed)
    pages_needed = [-(-s // page_size) for s, _ in shape]
    num_pages = sum(pages_needed) + 5  # spare pages so the used ones are not a dense block
    free = list(range(1, num_pages))  # page 0 is the padding page
    rng.shuffle(free)
    rows = list(range(len(shape) + 2))
    rng.shuffle(rows)
    seqs = []
    for (seq_len, extend_len), n, row in zip(shape, pages_needed, rows, strict=False):
        pages, free = free[:n], free[n:]
        slots = [pages[p // page_size] * page_size + p % page_size for p in range(seq_len)]
        k = torch.randn(seq_len, NUM_KV_HEADS, head_dim, dtype=torch.float64)
        v = torch.randn(seq_len, NUM_KV_HEADS, head_dim, dtype=torch.float64)
        seqs.append(Seq(seq_len, extend_len, k, v, slots, row))
    return seqs, num_pages * page_size


def _reference(seq: Seq, q: torch.Tensor) -> torch.Tensor:
    """Dense causal attention of the new tokens' q [E, H, D] over all positions, float64, GQA by hand."""
    group = NUM_HEADS // NUM_KV_HEADS
    k = seq.k.repeat_interleave(group, dim=1)  # [S, H, D]
    v = seq.v.repeat_interleave(group, dim=1)
    scores = torch.einsum("ehd,shd->hes", q.double().cpu(), k) / q.shape[-1] ** 0.5
    q_pos = torch.arange(seq.seq_len - seq.extend_len, seq.seq_len)
    future = torch.arange(seq.seq_len)[None, :] > q_pos[:, None]
    scores = scores.masked_fill(future[None], float("-inf"))
    return torch.einsum("hes,shd->ehd", scores.softmax(-1), v)


def _run(
    shape: list[tuple[int, int]],
    page_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    *,
    backend_name: str = "torch",
    device: torch.device = CPU,
    head_dim: int = HEAD_DIM,
    decode_kernel: str = "auto",
) -> None:
    torch.manual_seed(seed)
    seqs, num_slots = _make_seqs(shape, page_size, seed, head_dim)
    pool = KVPool(NUM_LAYERS, num_slots, NUM_KV_HEADS, head_dim, dtype=dtype, device=device)
    table = PageTable(len(seqs) + 2, 64, device=device)
    # Fill every unused slot and table entry with garbage: nothing outside a sequence may leak in.
    for layer in range(NUM_LAYERS):
        pool.k(layer)[1:] = torch.randn(num_slots - 1, NUM_KV_HEADS, head_dim).to(dtype) * 100
        pool.v(layer)[1:] = torch.randn(num_slots - 1, NUM_KV_HEADS, head_dim).to(dtype) * 100
    table.table[:] = torch.randint(1, num_slots, table.table.shape)
    layer = 1
    for s in seqs:
        table.write(s.row, 0, torch.tensor(s.slots))
        prefix = s.seq_len - s.extend_len
        slots = torch.tensor(s.slots[:prefix], dtype=torch.int64, device=device)
        pool.store(layer, slots, s.k[:prefix].to(device), s.v[:prefix].to(device))

    new = [(s, range(s.seq_len - s.extend_len, s.seq_len)) for s in seqs]
    qs = [torch.randn(s.extend_len, NUM_HEADS, head_dim, dtype=torch.float64) for s in seqs]
    out_slots = torch.tensor([s.slots[p] for s, ps in new for p in ps], device=device)

    def dev(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    batch = ForwardBatch(
        input_ids=torch.zeros(len(out_slots), dtype=torch.int64, device=device),
        positions=dev([p for _, ps in new for p in ps]),
        out_slots=out_slots,
        req_rows=dev([s.row for s in seqs]),
        seq_lens=dev([s.seq_len for s in seqs]),
        extend_lens=dev([s.extend_len for s in seqs]),
        logits_indices=torch.zeros(len(seqs), dtype=torch.int64, device=device),
        seq_lens_cpu=[s.seq_len for s in seqs],
        extend_lens_cpu=[s.extend_len for s in seqs],
    )
    backend = create_backend(
        backend_name,
        decode_kernel=decode_kernel,
        kv_pool=pool,
        page_table=table,
        num_heads=NUM_HEADS,
        head_dim=head_dim,
        page_size=page_size,
    )
    backend.prepare(batch)
    k_new = torch.cat([s.k[s.seq_len - s.extend_len :] for s in seqs]).to(device, dtype)
    v_new = torch.cat([s.v[s.seq_len - s.extend_len :] for s in seqs]).to(device, dtype)
    out = backend.forward(torch.cat(qs).to(device, dtype), k_new, v_new, layer)

    assert out.shape == (len(out_slots), NUM_HEADS, head_dim) and out.dtype == dtype
    want = torch.cat([_reference(s, q) for s, q in zip(seqs, qs, strict=True)])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double().cpu(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(pool.k(layer)[out_slots].double(), k_new.double())
    torch.testing.assert_close(pool.v(layer)[out_slots].double(), v_new.double())
    # Nothing else in the pool moved: backends write exactly the step's slots.


@pytest.mark.parametrize("page_size", [1, 4])
def test_mixed_prefill_chunks_and_decode(page_size: int) -> None:
    # (seq_len, extend_len): a chunk after a cached prefix, decodes, a fresh prefill, a 1-token prompt.
    _run([(11, 5), (7, 1), (6, 6), (1, 1), (19, 1), (9, 3)], page_size)


@pytest.mark.parametrize("page_size", [1, 4])
def test_pure_decode(page_size: int) -> None:
    _run([(5, 1), (17, 1), (1, 1), (12, 1)], page_size, seed=1)


@pytest.mark.parametrize("page_size", [1, 4])
def test_pure_prefill(page_size: int) -> None:
    _run([(13, 13), (4, 4), (21, 8)], page_size, seed=2)


def test_equal_length_chunks_after_different_prefixes() -> None:
    _run([(13, 4), (4, 4), (30, 4)], 4, seed=4)  # no query padding: the output needs no reordering


def test_bfloat16() -> None:
    _run([(11, 5), (7, 1), (6, 6)], 4, dtype=torch.bfloat16, seed=3)


def test_unknown_backend_is_a_usage_error() -> None:
    pool = KVPool(1, 4, 1, 8, dtype=torch.float32, device=CPU)
    table = PageTable(1, 4, device=CPU)
    with pytest.raises(UsageError, match="unknown attention backend"):
        create_backend("nope", kv_pool=pool, page_table=table, num_heads=1, head_dim=8, page_size=1)
    with pytest.raises(UsageError, match="unknown attention backend"):
        create_backend(
            "torch,torch,torch", kv_pool=pool, page_table=table, num_heads=1, head_dim=8, page_size=1
        )


def test_auto_and_pairs_resolve_to_torch_on_cpu() -> None:
    assert resolve_backend_names("auto", CPU, torch.float32) == ("torch", "torch")
    assert resolve_backend_names("auto,torch", CPU, torch.bfloat16) == ("torch", "torch")
    assert resolve_backend_names("flashinfer,torch", CPU, torch.bfloat16) == ("flashinfer", "torch")


def test_flashinfer_without_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the error path is for machines without one")
    pool = KVPool(1, 8, 1, 64, dtype=torch.bfloat16, device=CPU)
    table = PageTable(1, 8, device=CPU)
    with pytest.raises(MinisglError, match="needs FlashInfer and a CUDA GPU"):
        create_backend("flashinfer", kv_pool=pool, page_table=table, num_heads=1, head_dim=64, page_size=1)


CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# (seq_len, extend_len) batches: mixed extend and decode rows, pure decode, pure prefill.
GPU_SHAPES = {
    "mixed": [(11, 5), (7, 1), (6, 6), (1, 1), (19, 1), (40, 3)],
    "decode": [(5, 1), (17, 1), (1, 1), (33, 1), (2, 1)],
    "prefill": [(13, 13), (4, 4), (37, 8)],
}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend_name", ["torch", "flashinfer"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("shape", sorted(GPU_SHAPES))
def test_gpu_backends_against_float64(backend_name: str, head_dim: int, page_size: int, shape: str) -> None:
    _run(
        GPU_SHAPES[shape],
        page_size,
        torch.bfloat16,
        seed=5,
        backend_name=backend_name,
        device=CUDA,
        head_dim=head_dim,
    )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("decode_kernel", ["tensor-cores", "cuda-cores", "triton"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [1, 16])
def test_gpu_flashinfer_decode_kernels_against_float64(
    decode_kernel: str, head_dim: int, page_size: int
) -> None:
    _run(
        GPU_SHAPES["decode"],
        page_size,
        torch.bfloat16,
        seed=6,
        backend_name="flashinfer",
        device=CUDA,
        head_dim=head_dim,
        decode_kernel=decode_kernel,
    )
