"""NaiveCache: the prefix cache that caches nothing (`--cache-type naive`); every request computes its
whole prompt and gives all its pages back when it finishes."""

from __future__ import annotations

from collections.abc import Sequence

from minisgl_cli.engine.kv.prefix_cache import PrefixCache, PrefixCacheStats, PrefixMatch


class NaiveCache(PrefixCache):
    keeps_prefixes = False

    def __init__(self, page_size: int) -> None:
        super().__init__(page_size)
        self._queried_tokens = 0

    def match_prefix(self, token_ids: Sequence[int], *, count: bool = True) -> PrefixMatch:
        if count:
            self._queried_tokens += len(token_ids)
        return PrefixMatch(length=0)

    def lock(self, handle: object | None) -> None:
        pass

    def unlock(self, handle: object | None) -> None:
        pass

    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> list[int]:
        return list(pages)

    def evict(self, num_pages: int) -> list[int]:
        return []

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(queried_tokens=self._queried_tokens)
