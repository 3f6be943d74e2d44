"""Decode attention kernels at the engine's shapes, page size 1: FlashInfer's (split-KV or not, tensor or CUDA
cores; the plain wrapper and the CUDA-graph wrapper the engine captures) and the Triton kernel
(engine/attention/triton_decode.py) under several launch shapes. Each is timed as a CUDA graph of one call per
layer over distinct layers' K/V (so the reads go past L2); TB/s counts the K and V bytes read. Each Triton
line also gives its output's max abs difference from FlashInfer's (the engine's wrapper) on layer 0.

The batch-256 shape runs twice: page ids contiguous, then scattered as the engine's allocator leaves them
(each sequence's 300 prompt tokens contiguous, its 300 decoded tokens interleaved with the other sequences',
one step at a time, all over a pool of millions of slots). GPU only; prints one line a measurement.

    python3 scripts/decode_attention_bench.py
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass

import flashinfer
import torch

from minisgl_cli.engine.attention import triton_decode

D = 128
DEV = "cuda"
DTYPE = torch.bfloat16
WORKSPACE_BYTES = 256 << 20
POOL_SLOTS = 2_000_000  # the scattered case's pool per layer (and so only 8 layers of it: 65 GB)
CHUNK = 1024  # the scattered case's allocator hands out runs of this many free slots, in random order


@dataclass
class Problem:
    """One decode step's attention inputs: q, each layer's k and v [slots, hk, D] (views of one buffer per
    kind, as in the KV pool) and the page-size-1 page table."""

    label: str
    q: torch.Tensor
    k: torch.Tensor  # [layers, slots, hk, D]
    v: torch.Tensor
    indptr: torch.Tensor  # [bs + 1] int32, host
    indices: torch.Tensor  # [bs * ctx] int32, device

    @property
    def bs(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> tuple[int, int]:
        return self.q.shape[1], self.k.shape[2]

    @property
    def layers(self) -> int:
        return self.k.shape[0]

    def kv_bytes(self) -> int:
        return 2 * self.indices.numel() * self.heads[1] * D * DTYPE.itemsize


def contiguous(bs: int, ctx: int, hq: int, hk: int, layers: int) -> Problem:
    """`bs` sequences of `ctx` tokens, sequence i on slots [i * ctx, (i + 1) * ctx)."""
    k = torch.randn(layers, bs * ctx, hk, D, dtype=DTYPE, device=DEV)
    v = torch.randn_like(k)
    indptr = torch.arange(bs + 1, dtype=torch.int32) * ctx
    indices = torch.arange(bs * ctx, dtype=torch.int32, device=DEV)
    q = torch.randn(bs, hq, D, dtype=DTYPE, device=DEV)
    return Problem(f"bs {bs} ctx {ctx} heads {hq}/{hk}", q, k, v, indptr, indices)


def scattered(bs: int, prompt: int, decoded: int, hq: int, hk: int, layers: int) -> Problem:
    """`bs` sequences of `prompt` + `decoded` tokens in a pool of POOL_SLOTS: prompt i fills the start of a
    random CHUNK-slot run; then each decode step hands every sequence, in turn, the next free slot of further
    random runs, so one sequence's decoded tokens lie `bs` slots apart."""
    g = torch.Generator().manual_seed(0)
    runs = torch.randperm(POOL_SLOTS // CHUNK, generator=g)
    prompt_slots = runs[:bs, None] * CHUNK + torch.arange(prompt)
    decode_runs = runs[bs : bs + -(-bs * decoded // CHUNK)]
    decode_slots = (decode_runs[:, None] * CHUNK + torch.arange(CHUNK)).flatten()[: bs * decoded]
    slots = torch.cat([prompt_slots, decode_slots.view(decoded, bs).T], dim=1).flatten()
    indices = slots.to(torch.int32).to(DEV)
    k = torch.empty(layers, POOL_SLOTS, hk, D, dtype=DTYPE, device=DEV)
    v = torch.empty_like(k)
    for cache in (k, v):  # only the rows read are written: the rest of the pool is never touched
        cache[:, indices.long()] = torch.randn(layers, len(indices), hk, D, dtype=DTYPE, device=DEV)
    indptr = torch.arange(bs + 1, dtype=torch.int32) * (prompt + decoded)
    q = torch.randn(bs, hq, D, dtype=DTYPE, device=DEV)
    label = f"bs {bs} ctx {prompt + decoded} heads {hq}/{hk} scattered"
    return Problem(label, q, k, v, indptr, indices)


def ragged(bs: int, lo: int, hi: int, hq: int, hk: int, layers: int) -> Problem:
    """`bs` sequences of lengths uniform in [lo, hi] (as midway through the offline workload), on
    consecutive slots."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(lo, hi + 1, (bs,), generator=g)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    total = int(indptr[-1])
    k = torch.randn(layers, total, hk, D, dtype=DTYPE, device=DEV)
    v = torch.randn_like(k)
    indices = torch.arange(total, dtype=torch.int32, device=DEV)
    q = torch.randn(bs, hq, D, dtype=DTYPE, device=DEV)
    return Problem(f"bs {bs} ctx {lo}-{hi} heads {hq}/{hk} ragged", q, k, v, indptr, indices)


def time_graph(call: Callable[[int], object], layers: int) -> float:
    """Microseconds a layer of a CUDA graph holding `call(layer)` for every layer, over 20 replays."""
    for layer in range(min(2, layers)):  # compiles, plans' lazy work
        call(layer)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(torch.cuda.Stream()):
        with torch.cuda.graph(g):
            for layer in range(layers):
                call(layer)
    torch.cuda.synchronize()
    for _ in range(3):
        g.replay()
    b, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = 20
    b.record()
    for _ in range(n):
        g.replay()
    e.record()
    e.synchronize()
    return b.elapsed_time(e) * 1e3 / n / layers


def report(p: Problem, kernel: str, us: float, extra: str = "") -> None:
    print(f"{p.label} {kernel}: {us:.2f} us/layer, {p.kv_bytes() / us / 1e6:.2f} TB/s{extra}", flush=True)


def paged(p: Problem, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer's NHD paged view of a layer: [pages, page_size 1, hk, D]."""
    hk = p.heads[1]
    return p.k[layer].view(-1, 1, hk, D), p.v[layer].view(-1, 1, hk, D)


def flashinfer_plain(p: Problem, tensor_cores: bool, disable_split: bool) -> None:
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEV), "NHD", use_tensor_cores=tensor_cores
    )
    kw = {"disable_split_kv": True} if disable_split else {}
    last = torch.ones(p.bs, dtype=torch.int32)
    w.plan(p.indptr, p.indices, last, *p.heads, D, 1, q_data_type=DTYPE, kv_data_type=DTYPE, **kw)
    us = time_graph(lambda layer: w.run(p.q, paged(p, layer)), p.layers)
    report(p, f"flashinfer tc={tensor_cores} nosplit={disable_split}", us)


def flashinfer_graph(p: Problem) -> torch.Tensor:
    """The engine's captured-batch wrapper (FlashInferBackend.init_graphs), tensor cores from a group of 4;
    returns its layer-0 output, the Triton lines' reference."""
    tensor_cores = p.heads[0] // p.heads[1] >= 4
    w = flashinfer.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(
        torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEV),
        torch.zeros(p.bs + 1, dtype=torch.int32, device=DEV),
        torch.zeros(p.indices.numel(), dtype=torch.int32, device=DEV),
        torch.zeros(p.bs, dtype=torch.int32, device=DEV),
        "NHD",
        use_tensor_cores=tensor_cores,
    )
    last = torch.ones(p.bs, dtype=torch.int32)
    w.plan(p.indptr, p.indices, last, *p.heads, D, 1, q_data_type=DTYPE, kv_data_type=DTYPE)
    us = time_graph(lambda layer: w.run(p.q, paged(p, layer)), p.layers)
    report(p, f"flashinfer cuda-graph wrapper tc={tensor_cores}", us)
    out = w.run(p.q, paged(p, 0))
    torch.cuda.synchronize()
    return out


def triton_variants(p: Problem, ctx: int) -> list[dict[str, object]]:
    """The default launch shape and single changes of it, for both ways of computing the products."""
    default = triton_decode.plan(p.bs, *p.heads, D, ctx)
    variants: list[dict[str, object]] = []
    for use_dot in (default.use_dot, not default.use_dot):
        variants += [
            {"use_dot": use_dot},
            {"use_dot": use_dot, "block_n": 32},
            {"use_dot": use_dot, "block_n": 128},
            {"use_dot": use_dot, "num_warps": 8},
            {"use_dot": use_dot, "num_stages": 1},
            {"use_dot": use_dot, "num_stages": 3},
        ]
    for splits in (2 * default.num_splits, default.num_splits // 2):
        if splits >= 1:
            variants.append({"num_splits": splits})
    return variants


def triton(p: Problem, ctx: int, reference: torch.Tensor) -> None:
    indptr = p.indptr.to(DEV)
    out = torch.empty_like(p.q)
    scale = D**-0.5
    for kw in triton_variants(p, ctx):
        plan = triton_decode.plan(p.bs, *p.heads, D, ctx, **kw)  # type: ignore[arg-type]
        us = time_graph(
            lambda layer, plan=plan: plan.decode(p.q, p.k[layer], p.v[layer], indptr, p.indices, scale, out),
            p.layers,
        )
        plan.decode(p.q, p.k[0], p.v[0], indptr, p.indices, scale, out)
        diff = float((out.float() - reference.float()).abs().max())
        kernel = (
            f"triton dot={plan.use_dot} block_n={plan.block_n} warps={plan.num_warps} "
            f"stages={plan.num_stages} splits={plan.num_splits}"
        )
        report(p, kernel, us, f", max|diff| vs flashinfer {diff:.2e}")


def triton_ordered(p: Problem, reference: torch.Tensor) -> None:
    """The default Triton plan with and without the longest-first program order the backend passes."""
    indptr = p.indptr.to(DEV)
    order = torch.argsort(p.indptr[1:] - p.indptr[:-1], descending=True).to(torch.int32).to(DEV)
    out = torch.empty_like(p.q)
    scale = D**-0.5
    plan = triton_decode.plan(p.bs, *p.heads, D, triton_decode.MAX_SPLITS * triton_decode.BLOCK_N)
    for name, o in (("in batch order", None), ("longest first", order)):
        us = time_graph(
            lambda layer, o=o: plan.decode(
                p.q, p.k[layer], p.v[layer], indptr, p.indices, scale, out, None, o
            ),
            p.layers,
        )
        plan.decode(p.q, p.k[0], p.v[0], indptr, p.indices, scale, out, None, o)
        diff = float((out.float() - reference.float()).abs().max())
        report(
            p, f"triton default splits={plan.num_splits} {name}", us, f", max|diff| vs flashinfer {diff:.2e}"
        )


def run(p: Problem, ctx: int, plain: list[tuple[bool, bool]]) -> None:
    """`plain`: the (tensor cores, no split) variants of the plain wrapper to time."""
    for tc, ns in plain:
        flashinfer_plain(p, tc, ns)
    reference = flashinfer_graph(p)
    triton(p, ctx, reference)


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    if sys.argv[1:] == ["ragged"]:  # only the ragged batches: FlashInfer's graph wrapper against Triton
        for bs, hq in ((128, 32), (256, 16), (32, 32)):
            p = ragged(bs, 200, 2048, hq, 8, 24 if bs > 32 else 32)
            triton_ordered(p, flashinfer_graph(p))
            free()
        return
    for ctx in (640, 4096):  # llama-3.1-8b heads, batch 1
        run(contiguous(1, ctx, 32, 8, 32), ctx, [(True, False), (True, True)])
        free()
    both = [(False, False), (True, False)]
    run(contiguous(256, 600, 16, 8, 28), 600, both)  # qwen3-0.6b heads, a full decode batch
    free()
    run(scattered(256, 300, 300, 16, 8, 8), 600, both)
    free()
    flashinfer_plain(contiguous(128, 900, 16, 8, 28), False, False)
    free()
    run(contiguous(128, 900, 32, 8, 28), 900, both)  # qwen3-8b heads
    free()


if __name__ == "__main__":
    main()
