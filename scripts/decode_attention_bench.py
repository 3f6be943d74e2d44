"""FlashInfer decode attention variants (split-KV or not, tensor or CUDA cores), each timed as a CUDA graph of
one call per layer over distinct layers' K/V (so the reads go past L2). GPU only; prints one line a variant.

    python3 scripts/decode_attention_bench.py
"""

from __future__ import annotations

import flashinfer
import torch


def bench(bs: int, ctx: int, hq: int, hk: int, layers: int, tensor_cores: bool, disable_split: bool) -> None:
    """Batch `bs` of `ctx`-token sequences, `hq` query and `hk` KV heads of 128, page size 1."""
    d = 128
    dev = "cuda"
    kv = [torch.randn(bs * ctx, 2, hk, d, dtype=torch.bfloat16, device=dev).unbind(1) for _ in range(layers)]
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tensor_cores)
    indptr = torch.arange(bs + 1, dtype=torch.int32) * ctx
    indices = torch.arange(bs * ctx, dtype=torch.int32, device=dev)
    last = torch.ones(bs, dtype=torch.int32)
    kw = {"disable_split_kv": True} if disable_split else {}
    w.plan(indptr, indices, last, hq, hk, d, 1, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, **kw)
    q = torch.randn(bs, hq, d, dtype=torch.bfloat16, device=dev)
    caches = [(k.contiguous().view(-1, 1, hk, d), v.contiguous().view(-1, 1, hk, d)) for k, v in kv]
    for c in caches[:2]:
        w.run(q, c)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            for c in caches:
                w.run(q, c)
    torch.cuda.synchronize()
    for _ in range(3):
        g.replay()
    b, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    b.record()
    n = 20
    for _ in range(n):
        g.replay()
    e.record()
    e.synchronize()
    us = b.elapsed_time(e) * 1e3 / n / layers
    gb = 2 * bs * ctx * hk * d * 2 / 1e9
    print(
        f"bs {bs} ctx {ctx} heads {hq}/{hk} tc={tensor_cores} nosplit={disable_split}: {us:.2f} us/layer, {gb / us * 1e3:.2f} TB/s"
    )


def main() -> None:
    for tc, ns in ((True, False), (True, True)):
        for ctx in (640, 4096):
            bench(1, ctx, 32, 8, 32, tc, ns)  # llama-3.1-8b heads, batch 1
    for tc in (False, True):
        bench(256, 600, 16, 8, 28, tc, False)  # qwen3-0.6b heads, a full decode batch
    bench(128, 900, 16, 8, 28, False, False)


if __name__ == "__main__":
    main()
