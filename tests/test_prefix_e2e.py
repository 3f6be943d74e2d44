"""Prefix caching end to end: the LLM with cache_type "radix" gives exactly the greedy tokens of the
"naive" cache (which test_llm checks against transformers) on prompts sharing long prefixes, reports the
reused prompt tokens as usage.cached_tokens, prefills that many fewer tokens, and loses nothing when a
tiny KV pool forces evictions and preemptions."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_helpers import make_tiny_model

from minisgl_cli.engine.llm import LLM
from minisgl_cli.engine.outputs import RequestOutput
from minisgl_cli.engine.request import SamplingParams

# A 37-token "system prompt" (not a multiple of 4, so page_size 4 caches only its first 36 tokens), then
# user turns that differ from their first token on.
SYSTEM = [(11 * j) % 370 + 5 for j in range(37)]
TURNS = [[300, 301, 302], [310, 9, 9, 9, 9, 9], [320, 40], [330, 1, 2, 3, 4, 5, 6, 7, 8]]
PROMPTS = [SYSTEM + turn for turn in TURNS]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def tokens(outs: list[RequestOutput]) -> list[list[int]]:
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("prefix"), "llama", with_tokenizer=False)


def engine(model_dir: Path, cache_type: str, **kw: object) -> LLM:
    return LLM(str(model_dir), cache_type=cache_type, dtype="float32", max_running_requests=4, **kw)


@pytest.mark.parametrize("page_size", [1, 4])
def test_radix_reuses_shared_prefixes_and_changes_no_token(model_dir: Path, page_size: int) -> None:
    radix = engine(model_dir, "radix", page_size=page_size, kv_cache_tokens=2048)
    naive = engine(model_dir, "naive", page_size=page_size, kv_cache_tokens=2048)
    shared = len(SYSTEM) // page_size * page_size  # the system prompt's whole pages
    rounds = [
        (PROMPTS[:1], [0]),  # nothing cached yet
        (PROMPTS[1:], [shared] * 3),  # each reuses the system prompt of round 1, all in one batch
        # The same prompts again: all cached (prompt and output were inserted) but for the last token,
        # which is always computed for its logits; only whole pages.
        (PROMPTS, [(len(p) - 1) // page_size * page_size for p in PROMPTS]),
    ]
    for prompts, want_cached in rounds:
        got, want = radix.generate(prompts, greedy(12)), naive.generate(prompts, greedy(12))
        assert tokens(got) == tokens(want)
        assert [o.usage.cached_tokens for o in got] == want_cached
        assert all(o.usage.cached_tokens == 0 for o in want)

    total_cached = sum(sum(cached) for _, cached in rounds)
    r, n = radix.scheduler.stats(), naive.scheduler.stats()
    assert r.num_preemptions == n.num_preemptions == 0
    assert r.tokens_prefilled == n.tokens_prefilled - total_cached
    assert r.tokens_generated == n.tokens_generated
    cache = radix.scheduler.cache.stats()
    assert cache.hit_tokens == total_cached
    assert r.prefix_hit_tokens == total_cached and n.prefix_hit_rate == 0.0
    assert r.prefix_hit_rate == total_cached / r.prefix_queried_tokens > 0.5
    # Idle: every page is free or cached, and no cached page is locked.
    assert radix.scheduler.allocator.num_free + cache.cached_pages == radix.scheduler.allocator.num_usable
    assert cache.evictable_pages == cache.cached_pages > 0


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_tiny_pool_evicts_and_preempts_without_corrupting_outputs(
    model_dir: Path, page_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    naive = engine(model_dir, "naive", page_size=page_size, kv_cache_tokens=2048)
    # 96 slots for 4 running requests of up to ~70 tokens, a 16-token prefill budget: chunked prompts,
    # decode runs out of pages (preemption), and cached prefixes must be evicted to admit new requests.
    radix = engine(model_dir, "radix", page_size=page_size, kv_cache_tokens=96, max_prefill_tokens=16)
    sched = radix.scheduler
    evicted: list[int] = []
    evict = sched.cache.evict

    def counting_evict(num_pages: int) -> list[int]:
        pages = evict(num_pages)
        evicted.extend(pages)
        return pages

    monkeypatch.setattr(sched.cache, "evict", counting_evict)
    params = [greedy(12 + 5 * i) for i in range(len(PROMPTS))]
    cached = []
    for _ in range(3):
        got = radix.generate(PROMPTS, params)
        assert tokens(got) == tokens(naive.generate(PROMPTS, params))
        cached += [o.usage.cached_tokens for o in got]
    cache = sched.cache.stats()
    assert sched.stats().num_preemptions > 0 and evicted and any(cached)
    assert sched.allocator.num_free + cache.cached_pages == sched.allocator.num_usable
    assert cache.evictable_pages == cache.cached_pages


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_prefix_is_reused_while_the_request_that_computed_it_still_runs(
    model_dir: Path, page_size: int
) -> None:
    # All four submitted together. The 40-token prefill budget admits only the first request in step one
    # (its 40-token prompt); its whole pages are cached as that step completes, so the other three,
    # admitted in step two while the first is decoding, find the system prompt already there.
    radix = engine(model_dir, "radix", page_size=page_size, kv_cache_tokens=2048, max_prefill_tokens=40)
    naive = engine(model_dir, "naive", page_size=page_size, kv_cache_tokens=2048, max_prefill_tokens=40)
    got, want = radix.generate(PROMPTS, greedy(12)), naive.generate(PROMPTS, greedy(12))
    assert tokens(got) == tokens(want)
    shared = len(SYSTEM) // page_size * page_size
    assert [o.usage.cached_tokens for o in got] == [0, shared, shared, shared]
    assert radix.scheduler.stats().tokens_prefilled == naive.scheduler.stats().tokens_prefilled - 3 * shared


def test_a_prefix_computed_twice_in_one_step_is_cached_once(model_dir: Path) -> None:
    # A 20-token shared start, shorter than the scheduler's in-batch check: both requests are prefilled in the
    # same step and both compute it; the second one's copies are freed as the step completes and it reads
    # the first one's pages from then on.
    shared = SYSTEM[:20]
    prompts = [shared + [300, 301, 302], shared + [310, 9, 9, 9]]
    radix = engine(model_dir, "radix", kv_cache_tokens=2048)
    naive = engine(model_dir, "naive", kv_cache_tokens=2048)
    assert tokens(radix.generate(prompts, greedy(16))) == tokens(naive.generate(prompts, greedy(16)))
    sched = radix.scheduler
    cache = sched.cache.stats()
    # Idle again: the shared start is cached once (one node), not twice.
    assert sched.allocator.num_free + cache.cached_pages == sched.allocator.num_usable
    per_request = [len(p) + 16 - 1 for p in prompts]  # computed tokens: the last sampled one is not
    assert cache.cached_pages == len(shared) + sum(n - len(shared) for n in per_request)


@pytest.mark.parametrize("page_size", [1, 4])
def test_requests_sharing_a_long_uncached_prefix_compute_it_once(model_dir: Path, page_size: int) -> None:
    # All four arrive together with room for all in one step; the system prompt is computed by the first
    # only: the others wait one step and find it cached.
    radix = engine(model_dir, "radix", page_size=page_size, kv_cache_tokens=2048)
    naive = engine(model_dir, "naive", page_size=page_size, kv_cache_tokens=2048)
    got, want = radix.generate(PROMPTS, greedy(8)), naive.generate(PROMPTS, greedy(8))
    assert tokens(got) == tokens(want)
    shared = len(SYSTEM) // page_size * page_size
    assert [o.usage.cached_tokens for o in got] == [0, shared, shared, shared]
    assert radix.scheduler.stats().tokens_prefilled == naive.scheduler.stats().tokens_prefilled - 3 * shared
