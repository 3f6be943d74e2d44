"""The Triton paged decode attention (engine/attention/triton_decode.py) against a float64 attention computed
from the gathered K/V rows.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, in a process of its own, as in
test_triton_kernels.py) over small cases: GQA groups 1 to 8, head_dim 64 and 128, slot ids scattered over a
pool whose other rows are NaN (a read outside a sequence's rows would show), ragged lengths (1, and not
multiples of the block), one split and several (more than a short sequence has blocks, so some are empty),
both the tl.dot and the CUDA-core-product variants, float32 and bfloat16, pages of 1 and 4 slots, and one
plan replayed over two batches written into the same buffers (as a CUDA graph replays it). On a GPU the same
comparison runs at engine-like sizes in bfloat16.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from test_triton_kernels import HAVE_TRITON

from minisgl_cli.engine.attention import triton_decode

NAN = float("nan")


@dataclass
class Batch:
    """One decode batch over a K/V pool: the kernel's index arrays and each sequence's token slots."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    indptr: torch.Tensor
    indices: torch.Tensor
    last_page_len: torch.Tensor
    token_slots: list[torch.Tensor]


def _batch(lengths: list[int], heads: tuple[int, int], head_dim: int, dtype: torch.dtype, *, seed: int,
           page_size: int = 1, device: str = "cpu", kv_dtype: torch.dtype | None = None) -> Batch:  # fmt: skip
    """Sequences of `lengths` tokens on random pages (page 0 among them) of a pool twice as large, whose
    unused rows hold NaN; K/V in `kv_dtype` (default: `dtype`)."""
    g = torch.Generator().manual_seed(seed)
    hq, hk = heads
    num_pages = [-(-n // page_size) for n in lengths]
    total = sum(num_pages)
    pool_pages = 2 * total + 3
    pages = torch.randperm(pool_pages, generator=g)[:total]
    if total and not (pages == 0).any():
        pages[int(torch.randint(0, total, (1,), generator=g))] = 0
    starts = [0, *torch.tensor(num_pages, dtype=torch.int64).cumsum(0).tolist()]
    token_slots = []
    for i, n in enumerate(lengths):
        t = torch.arange(n)
        token_slots.append(pages[starts[i] + t // page_size] * page_size + t % page_size)
    k = torch.full((pool_pages * page_size, hk, head_dim), NAN)
    v = torch.full_like(k, NAN)
    used = torch.cat(token_slots)
    k[used] = torch.randn(len(used), hk, head_dim, generator=g)
    v[used] = torch.randn(len(used), hk, head_dim, generator=g)
    # Scaled up so the scores spread and the online softmax's rescaling matters.
    q = torch.randn(len(lengths), hq, head_dim, generator=g) * 2
    last = [n - (p - 1) * page_size for n, p in zip(lengths, num_pages, strict=True)]
    return Batch(
        q=q.to(dtype).to(device),
        k=k.to(kv_dtype or dtype).to(device),
        v=v.to(kv_dtype or dtype).to(device),
        indptr=torch.tensor(starts, dtype=torch.int32, device=device),
        indices=pages.to(torch.int32).to(device),
        last_page_len=torch.tensor(last, dtype=torch.int32, device=device),
        token_slots=token_slots,
    )


def _reference(batch: Batch, scale: float) -> torch.Tensor:
    """float64 attention of each sequence's query over its gathered rows; query head j reads KV head j // G."""
    hq, hk = batch.q.shape[1], batch.k.shape[1]
    out = torch.zeros(batch.q.shape, dtype=torch.float64)
    for i, slots in enumerate(batch.token_slots):
        if len(slots) == 0:
            continue
        slots = slots.to(batch.k.device)
        k = batch.k[slots].double().cpu().repeat_interleave(hq // hk, dim=1)  # [L, Hq, D]
        v = batch.v[slots].double().cpu().repeat_interleave(hq // hk, dim=1)
        scores = torch.einsum("hd,lhd->hl", batch.q[i].double().cpu(), k) * scale
        out[i] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v)
    return out


FP8_CASES = [  # (heads, head_dim, q dtype, splits, use_dot, page_size), over an FP8 pool
    ((4, 2), 64, torch.float32, 1, True, 1),
    ((8, 2), 128, torch.float32, 3, False, 1),
    ((8, 1), 64, torch.float32, 3, True, 4),
]


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: object) -> None:
    # float32: the order of the sums; bfloat16: the output's rounding (and, for tl.dot, the weights').
    tol = 2e-5 if got.dtype == torch.float32 else 1e-2
    err = (got.double().cpu() - want).abs()
    assert not got.isnan().any(), (what, "NaN")
    assert (err <= tol * (1 + want.abs())).all(), (what, float(err.max()))


def _decode(
    p: triton_decode.DecodePlan,
    batch: Batch,
    out: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    if out is None:
        out = torch.full_like(batch.q, NAN)
    scale = batch.q.shape[-1] ** -0.5
    last = batch.last_page_len if p.page_size > 1 else None
    return p.decode(batch.q, batch.k, batch.v, batch.indptr, batch.indices, scale, out, last, order)


HEADS = ((2, 2), (4, 2), (8, 2), (8, 1))  # groups 1, 2, 4, 8
LENGTHS = [1, 37, 16, 70]  # block_n 16: one token, a ragged block, one whole block, several blocks
CPU_CASES = [
    (heads, head_dim, dtype, splits, use_dot, page_size)
    for heads in HEADS
    for head_dim in (64, 128)
    for dtype in (torch.float32, torch.bfloat16)
    for splits in (1, 3)
    for use_dot in (False, True)
    for page_size in (1,)
] + [
    # 8 splits: more than the 1- and 16-token sequences have blocks, so most of theirs are empty.
    ((4, 2), 64, torch.bfloat16, 8, False, 1),
    ((8, 1), 128, torch.float32, 8, True, 1),
    # Pages of 4 slots, through the same gather: last pages of 1, 1, 4 and 2 tokens.
    ((4, 2), 64, torch.float32, 1, False, 4),
    ((8, 2), 128, torch.bfloat16, 3, True, 4),
]


def check_interpreted() -> int:
    """Every CPU case through the kernels and the float64 reference. Run with TRITON_INTERPRET=1 (Triton
    reads it when first imported)."""
    for n, (heads, head_dim, dtype, splits, use_dot, page_size) in enumerate(CPU_CASES):
        case = (heads, head_dim, dtype, splits, use_dot, page_size)
        lengths = LENGTHS[n % 4 :] + LENGTHS[: n % 4]  # each length in each position over the cases
        batch = _batch(lengths, heads, head_dim, dtype, seed=n, page_size=page_size)
        p = triton_decode.plan(
            len(lengths), *heads, head_dim, max(lengths), device="cpu", page_size=page_size,
            num_splits=splits, block_n=16, use_dot=use_dot,
        )  # fmt: skip
        # Every other case starts the longest sequences' programs first (the backend's order): same output.
        order = torch.argsort(torch.tensor(lengths), descending=True).to(torch.int32) if n % 2 else None
        got = _decode(p, batch, order=order)
        assert got.dtype == dtype
        _assert_close(got, _reference(batch, head_dim**-0.5), case)
    return len(CPU_CASES)


def check_interpreted_fp8() -> None:
    """An FP8 pool (NaN rows included): the kernels widen each row to q's dtype as they read it, so the
    output is the float64 attention over the FP8 values themselves, to float32's rounding."""
    for n, (heads, head_dim, dtype, splits, use_dot, page_size) in enumerate(FP8_CASES):
        lengths = LENGTHS[n:] + LENGTHS[:n]
        batch = _batch(lengths, heads, head_dim, dtype, seed=50 + n, page_size=page_size,
                       kv_dtype=torch.float8_e4m3fn)  # fmt: skip
        p = triton_decode.plan(
            len(lengths), *heads, head_dim, max(lengths), device="cpu", page_size=page_size,
            num_splits=splits, block_n=16, use_dot=use_dot,
        )  # fmt: skip
        got = _decode(p, batch)
        assert got.dtype == dtype
        _assert_close(got, _reference(batch, head_dim**-0.5), ("fp8", n))


def check_interpreted_replay() -> None:
    """One plan and one set of index/output buffers, two batches written into them in turn (a graph replay's
    view): the buffers are larger than the second batch needs, and their unused tail points at a NaN row."""
    heads, head_dim = (4, 2), 64
    rounds = ([5, 40, 19], [33, 1, 0])
    for dtype in (torch.float32, torch.bfloat16):
        pool = _batch([sum(r) for r in rounds], heads, head_dim, dtype, seed=7)
        poison = int(torch.isnan(pool.k[:, 0, 0]).nonzero()[0])
        p = triton_decode.plan(3, *heads, head_dim, 64, device="cpu", num_splits=4, block_n=16)
        indptr = torch.zeros(4, dtype=torch.int32)
        indices = torch.full((128,), poison, dtype=torch.int32)
        out = torch.full((3, heads[0], head_dim), NAN, dtype=dtype)
        for r, lengths in enumerate(rounds):
            slots = pool.token_slots[r]
            seq_slots = list(slots.split(lengths))
            indices.fill_(poison)
            indices[: len(slots)] = slots.to(torch.int32)
            indptr.copy_(torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32))
            q = torch.randn(3, heads[0], head_dim, generator=torch.Generator().manual_seed(r)).to(dtype)
            batch = Batch(q, pool.k, pool.v, indptr, indices, indptr, seq_slots)
            got = _decode(p, batch, out)
            assert got is out
            want = _reference(batch, head_dim**-0.5)
            _assert_close(got, want, (dtype, lengths))
            assert (got[2] == 0).all() if lengths[2] == 0 else True  # an empty sequence: zeros


if __name__ == "__main__":
    count = check_interpreted()
    check_interpreted_fp8()
    check_interpreted_replay()
    print(f"{count} cases equal")


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton 3.9+ (its CPU interpreter)")
def test_interpreted_kernels_equal_float64_attention() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"{len(CPU_CASES)} cases equal"


def test_splits_fill_the_gpu_only_where_the_batch_does_not() -> None:
    # 256 sequences x 8 KV heads: 15 programs per SM of an H200 already.
    assert triton_decode.choose_splits(256, 8, 2000, 64, 132) == 1
    # One sequence: as many as 4 programs per SM asks for, capped by its blocks and MAX_SPLITS.
    assert triton_decode.choose_splits(1, 8, 640, 64, 132) == 10
    assert triton_decode.choose_splits(1, 8, 100_000, 64, 132) == triton_decode.MAX_SPLITS
    assert triton_decode.choose_splits(32, 8, 2000, 64, 132) == 3
    p = triton_decode.plan(2, 8, 2, 64, 1000, device="cpu", num_sms=4)
    assert p.num_splits == 4 and p.partial_out.shape == (2, 8, 4, 64) and p.partial_lse.shape == (2, 8, 4)
    assert p.use_dot and triton_decode.plan(2, 4, 2, 64, 100, device="cpu").use_dot  # tl.dot for any group
    assert not triton_decode.plan(2, 4, 2, 64, 100, device="cpu", use_dot=False).use_dot
    one = triton_decode.plan(256, 16, 8, 128, 2000, device="cpu")
    assert one.num_splits == 1 and one.partial_out.numel() == 0


def test_shapes_the_plan_cannot_take_are_refused() -> None:
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        triton_decode.plan(2, 4, 2, 96, 100, device="cpu")
    with pytest.raises(ValueError, match="do not split into groups"):
        triton_decode.plan(2, 6, 4, 64, 100, device="cpu")
    p = triton_decode.plan(2, 4, 2, 64, 100, device="cpu")
    batch = _batch([3, 4, 5], (4, 2), 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match="this plan decodes"):
        _decode(p, batch)
    three = triton_decode.plan(3, 4, 2, 64, 100, device="cpu")
    with pytest.raises(ValueError, match="or float8_e4m3fn"):
        three.decode(
            batch.q, batch.k.half(), batch.v.half(), batch.indptr, batch.indices, 0.1, batch.q.clone()
        )
    paged = triton_decode.plan(3, 4, 2, 64, 100, device="cpu", page_size=4)
    with pytest.raises(ValueError, match="needs kv_last_page_len"):
        paged.decode(batch.q, batch.k, batch.v, batch.indptr, batch.indices, 0.1, batch.q.clone())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads", [(16, 8), (32, 8), (8, 8)])
@pytest.mark.parametrize("use_dot", [False, True])
@pytest.mark.parametrize(("splits", "page_size"), [(None, 1), (1, 1), (5, 1), (None, 16)])
def test_gpu_kernels_equal_float64_attention(
    heads: tuple[int, int], use_dot: bool, splits: int | None, page_size: int
) -> None:
    g = torch.Generator().manual_seed(heads[0] + page_size)
    lengths = [1, 2000, *torch.randint(1, 1200, (14,), generator=g).tolist()]
    batch = _batch(lengths, heads, 128, torch.bfloat16, seed=3, page_size=page_size, device="cuda")
    p = triton_decode.plan(
        len(lengths), *heads, 128, 2000, page_size=page_size, num_splits=splits, use_dot=use_dot
    )
    got = _decode(p, batch)
    torch.cuda.synchronize()
    _assert_close(got, _reference(batch, 128**-0.5), (heads, use_dot, splits, page_size))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("heads", "splits", "page_size"), [((32, 8), None, 1), ((16, 8), 1, 1), ((8, 2), 5, 16)]
)
def test_gpu_kernels_read_an_fp8_pool(heads: tuple[int, int], splits: int | None, page_size: int) -> None:
    """bf16 queries over FP8 K/V: the float64 attention of the FP8 values, to bf16's rounding."""
    g = torch.Generator().manual_seed(heads[0] + page_size)
    lengths = [1, 2000, *torch.randint(1, 1200, (14,), generator=g).tolist()]
    batch = _batch(lengths, heads, 128, torch.bfloat16, seed=4, page_size=page_size, device="cuda",
                   kv_dtype=torch.float8_e4m3fn)  # fmt: skip
    p = triton_decode.plan(len(lengths), *heads, 128, 2000, page_size=page_size, num_splits=splits)
    got = _decode(p, batch)
    torch.cuda.synchronize()
    _assert_close(got, _reference(batch, 128**-0.5), (heads, splits, page_size))
