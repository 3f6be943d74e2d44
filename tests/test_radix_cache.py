"""RadixCache on hand-built trees (match, insert, split, lock, evict with page sizes 1 and 4), and a property
test against a brute-force model: a dict from every cached whole-page prefix to the page holding its last
page, with a fake page allocator checking that no page is ever lost, freed twice, or evicted while locked."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minisgl_cli.engine.kv.radix_cache import RadixCache


def test_match_insert_and_split_token_granularity() -> None:
    cache = RadixCache(1)
    assert cache.match_prefix([1, 2, 3]).length == 0 and cache.match_prefix([1, 2, 3]).handle is None
    assert cache.insert([1, 2, 3, 4], [10, 11, 12, 13]) == []
    m = cache.match_prefix([1, 2, 3, 9])  # ends inside the edge [1, 2, 3, 4]: split after 3 tokens
    assert (m.length, m.pages) == (3, [10, 11, 12]) and m.handle is not None
    assert cache.match_prefix([1, 2, 3, 4, 5]).pages == [10, 11, 12, 13]  # the split lost nothing
    # A branch sharing [1, 2]: its own copies of the shared pages go back, the new suffix is kept.
    assert sorted(cache.insert([1, 2, 5, 6], [20, 21, 22, 23])) == [20, 21]
    assert cache.match_prefix([1, 2, 5, 6, 7]).pages == [10, 11, 22, 23]
    assert cache.match_prefix([1, 2, 3, 4]).pages == [10, 11, 12, 13]
    assert cache.match_prefix([2, 1]).length == 0
    stats = cache.stats()
    assert (stats.cached_pages, stats.evictable_pages) == (6, 6)
    assert (stats.hit_tokens, stats.queried_tokens) == (3 + 4 + 4 + 4, 3 + 3 + 4 + 5 + 5 + 4 + 2)
    # The least recently used leaf is [5, 6]: it goes whole, more pages than asked for.
    assert cache.evict(1) == [22, 23] and cache.stats().cached_pages == 4


def test_pages_cover_whole_pages_only() -> None:
    cache = RadixCache(4)
    ids = list(range(100, 110))  # 10 tokens: 2 whole pages and a partial one
    assert cache.insert(ids, [1, 2, 3, 4]) == [3, 4]  # the partial page and a spare one go back
    m = cache.match_prefix(ids[:9])
    assert (m.length, m.pages) == (8, [1, 2])
    m = cache.match_prefix(ids[:7] + [0, 0])  # differs inside the 2nd page: the edge splits after page 1
    assert (m.length, m.pages) == (4, [1])
    assert cache.match_prefix(ids[:3]).length == 0  # shorter than a page
    assert cache.match_prefix([100, 101, 102, 0, 104]).length == 0  # differs inside the first page
    # A request that read pages 1 and 2 from the cache gives them back with its own pages: they stay.
    assert cache.insert(ids + [7, 7, 7, 7, 7], [1, 2, 5, 6]) == [6]
    assert cache.match_prefix(ids + [7, 7, 7, 7, 7]).pages == [1, 2, 5]
    assert cache.stats().cached_pages == 3


def test_lock_protects_the_path_and_evict_takes_lru_leaves() -> None:
    cache = RadixCache(2)
    cache.insert([1, 1, 2, 2], [1, 2])  # A
    cache.insert([1, 1, 3, 3], [9, 3])  # B: shares page [1, 1] (its copy, 9, goes back)
    cache.insert([4, 4], [4])  # C
    a = cache.match_prefix([1, 1, 2, 2])  # used in the order A, C, B
    cache.match_prefix([4, 4])
    cache.match_prefix([1, 1, 3, 3])
    cache.lock(a.handle)
    assert cache.stats().evictable_pages == 2  # B's and C's leaves; A's path [1, 1] + [2, 2] is locked
    assert cache.evict(1) == [4]  # C: the least recently used unlocked leaf
    assert cache.evict(5) == [3]  # B; the shared [1, 1] stays: A's lock covers it
    assert cache.evict(1) == [] and cache.stats().cached_pages == 2
    cache.lock(a.handle)
    cache.unlock(a.handle)
    assert cache.evict(1) == []  # still locked once
    cache.unlock(a.handle)
    assert cache.stats().evictable_pages == 2
    assert cache.evict(1) == [2]  # one leaf frees enough
    assert cache.evict(1) == [1]  # its parent became a leaf
    assert cache.stats().cached_pages == 0 and cache.match_prefix([1, 1]).length == 0
    with pytest.raises(RuntimeError, match="unlocked more often"):
        cache.unlock(a.handle)


def test_insert_counts_as_use() -> None:
    cache = RadixCache(1)
    cache.insert([1], [1])
    cache.match_prefix([1])
    cache.insert([2], [2])  # newer than the match of [1]
    assert cache.evict(1) == [1]


def test_a_split_keeps_the_lock_of_the_node_it_cut() -> None:
    cache = RadixCache(1)
    cache.insert([1, 2, 3], [1, 2, 3])
    whole = cache.match_prefix([1, 2, 3])
    cache.lock(whole.handle)
    cache.match_prefix([1, 2, 7])  # splits [1, 2, 3] into [1, 2] -> [3]
    cache.insert([1, 2, 7], [9, 9, 7])
    assert cache.evict(10) == [7]  # [1, 2] is locked through its child [3]
    cache.unlock(whole.handle)
    assert sorted(cache.evict(10)) == [1, 2, 3]


# ---- the property test


@dataclass
class _Live:
    """A request holding pages: the matched (cached, locked) ones and its own."""

    ids: list[int]
    pages: list[int]
    handle: object | None
    matched: int  # tokens matched at start


class _Model:
    """The brute-force reference: every cached whole-page prefix -> the page holding its last page."""

    def __init__(self, page_size: int, num_pages: int) -> None:
        self.ps = page_size
        self.num_pages = num_pages
        self.cached: dict[tuple[int, ...], int] = {}
        self.free = set(range(num_pages))
        self.live: list[_Live] = []

    def match(self, ids: list[int]) -> tuple[int, list[int]]:
        pages: list[int] = []
        for end in range(self.ps, len(ids) + 1, self.ps):
            page = self.cached.get(tuple(ids[:end]))
            if page is None:
                break
            pages.append(page)
        return len(pages) * self.ps, pages

    def locked_pages(self) -> set[int]:
        return {p for r in self.live for p in r.pages[: r.matched // self.ps]}

    def check(self, cache: RadixCache) -> None:
        cached = set(self.cached.values())
        assert len(cached) == len(self.cached)  # one page per prefix
        private = [p for r in self.live for p in r.pages[r.matched // self.ps :]]
        assert len(private) == len(set(private))
        # Every page is exactly one of: free, cached, a running request's own.
        assert not (self.free & cached) and not (self.free & set(private)) and not (cached & set(private))
        assert len(self.free) + len(cached) + len(private) == self.num_pages
        assert self.locked_pages() <= cached
        for prefix in self.cached:  # prefix-closed, as a tree is
            assert len(prefix) == self.ps or prefix[: -self.ps] in self.cached
        stats = cache.stats()
        assert stats.cached_pages == len(cached)
        assert stats.evictable_pages == len(cached - self.locked_pages())


# Prompts share long prefixes, as chats with one system prompt do: a prefix of one of these, then a few
# random tokens.
_BASES = ([1] * 12, [1] * 4 + [2] * 8, [1, 1, 2, 2, 3, 3] * 2)
_IDS = st.builds(
    lambda base, n, tail: base[:n] + tail,
    st.sampled_from(_BASES),
    st.integers(0, 12),
    st.lists(st.integers(0, 3), max_size=3),
)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("start"), _IDS, st.integers(0, 3)),  # with this many slots reserved beyond the ids
        # finish the i-th live request (mod), having computed a fraction of its tokens (preemption: < 1)
        st.tuples(st.just("finish"), st.integers(0, 7), st.sampled_from([0.0, 0.5, 1.0])),
        st.tuples(st.just("evict"), st.integers(0, 6)),
    ),
    min_size=15,  # long enough runs for the pool to fill and evictions to meet locks
    max_size=50,
)


@settings(max_examples=150, deadline=None, database=None)
@given(page_size=st.sampled_from([1, 2, 4]), ops=_OPS)
def test_matches_a_brute_force_model_and_never_loses_a_page(page_size: int, ops: list[tuple]) -> None:
    num_pages = 16
    cache = RadixCache(page_size)
    model = _Model(page_size, num_pages)

    def alloc(n: int) -> list[int] | None:
        short = n - len(model.free)
        if short > 0:
            evict(short)
        if n > len(model.free):
            return None
        return [model.free.pop() for _ in range(n)]

    def evict(n: int) -> None:
        evictable = cache.stats().evictable_pages
        locked = model.locked_pages()
        freed = cache.evict(n)
        assert len(freed) >= min(n, evictable) and len(freed) <= evictable
        assert not set(freed) & locked
        by_page = {page: prefix for prefix, page in model.cached.items()}
        for page in freed:
            del model.cached[by_page[page]]  # KeyError: evicted a page that was not cached
        model.free.update(freed)

    def finish(req: _Live, computed: int) -> None:
        """The request's first `computed` tokens have their K/V: offer its pages to the cache."""
        ids = req.ids[:computed]
        returned = cache.insert(ids, req.pages)
        cache.unlock(req.handle)
        kept = []
        for j in range(len(ids) // page_size):
            prefix = tuple(ids[: (j + 1) * page_size])
            if prefix not in model.cached:
                model.cached[prefix] = req.pages[j]
            if model.cached[prefix] == req.pages[j]:
                kept.append(req.pages[j])
        assert sorted(returned) == sorted(set(req.pages) - set(kept))
        model.free.update(returned)

    for op in ops:
        if op[0] == "start":
            _, ids, extra = op
            length, pages = model.match(ids)
            m = cache.match_prefix(ids)
            assert (m.length, m.pages) == (length, pages)
            cache.lock(m.handle)
            req = _Live(ids, list(m.pages), m.handle, m.length)
            model.live.append(req)  # first, so that the eviction below knows its pages are locked
            own = alloc(-(-(len(ids) + extra) // page_size) - len(m.pages))
            if own is None:
                model.live.remove(req)
                cache.unlock(m.handle)
            else:
                req.pages += own
        elif op[0] == "finish" and model.live:
            _, i, fraction = op
            req = model.live.pop(i % len(model.live))
            finish(req, req.matched + int((len(req.ids) - req.matched) * fraction))
        elif op[0] == "evict":
            evict(op[1])
        model.check(cache)

    while model.live:  # every request ends: all pages come back once the cache is emptied
        req = model.live.pop()
        finish(req, len(req.ids))
    model.check(cache)
    evict(num_pages)
    assert not model.cached and model.free == set(range(num_pages)) and cache.stats().cached_pages == 0
