"""Check a running `minisgl serve` against the in-process engine on the same model, through /generate.

    minisgl serve --dummy-weights -m qwen3-0.6b --mem-fraction 0.4 --port 8011 &
    python3 scripts/serve_check.py --url http://127.0.0.1:8011 -m qwen3-0.6b --dummy-weights

Sends --num-requests greedy requests (random token ids, --concurrency at a time, ignore_eos) and checks that
each returns exactly its max_new_tokens ids (exit 1 otherwise). It also reports how many of the first few
equal what `LLM` generates in this process for the same prompts, and where they first differ: with dummy
weights the logits are nearly flat, so bf16 rounding that differs with the batch's make-up can flip a greedy
pick; that count is information, not a pass/fail. For models without a tokenizer (dummy weights), where
the OpenAI endpoints carry no text.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

import httpx


async def _run(
    url: str, prompts: list[list[int]], max_tokens: list[int], concurrency: int
) -> list[list[int]]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(ids: list[int], n: int) -> list[int]:
            body = {
                "input_ids": ids,
                "sampling_params": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True},
            }
            async with limit:
                response = await client.post("/generate", json=body)
            response.raise_for_status()
            return list(response.json()["output_ids"])

        return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, max_tokens, strict=True)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--dummy-weights", action="store_true")
    ap.add_argument("--dtype", default="auto", help="the in-process engine's; the server's --dtype")
    ap.add_argument("--kv-cache-tokens", type=int, default=200_000, help="the in-process engine's KV pool")
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--compare", type=int, default=8, help="requests also run in-process and compared")
    args = ap.parse_args()

    rng = random.Random(0)
    prompts = [
        [rng.randrange(1000, 30000) for _ in range(rng.randint(32, 512))] for _ in range(args.num_requests)
    ]
    max_tokens = [rng.randint(16, 128) for _ in prompts]
    start = time.perf_counter()
    outputs = asyncio.run(_run(args.url, prompts, max_tokens, args.concurrency))
    elapsed = time.perf_counter() - start
    wrong_len = sum(len(o) != n for o, n in zip(outputs, max_tokens, strict=True))

    from minisgl_cli.engine.llm import LLM
    from minisgl_cli.engine.request import SamplingParams

    llm = LLM(
        args.model,
        dummy_weights=args.dummy_weights,
        dtype=args.dtype,
        kv_cache_tokens=args.kv_cache_tokens,
        max_running_requests=64,
    )
    k = args.compare
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens[:k]]
    local = [o.token_ids for o in llm.generate(prompts[:k], params)]
    firsts = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        for a, b in zip(local, outputs[:k], strict=True)
    ]
    tokens = sum(len(o) for o in outputs)
    print(
        f"serve: {len(outputs)} requests, {tokens} tokens in {elapsed:.1f} s ({tokens / elapsed:,.0f} tok/s); "
        f"wrong length: {wrong_len}; equal to in-process greedy: {firsts.count(None)} of {k} "
        f"(first differences at {firsts})"
    )
    sys.exit(0 if wrong_len == 0 else 1)


if __name__ == "__main__":
    main()
