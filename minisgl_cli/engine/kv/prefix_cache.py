"""PrefixCache: which KV pages hold which token prefixes, so requests sharing a prefix reuse its K/V.

The scheduler owns the page allocator; a cache only decides which pages it keeps. The protocol:
  1. admission: `match_prefix(ids)` -> the longest cached prefix (a whole number of pages) and a handle;
     `lock(handle)` keeps those pages from eviction while the request reads them;
  2. finish or preemption: `insert(ids, pages)` offers the request's pages (page i holds the K/V of
     ids[i * page_size : (i + 1) * page_size]); the cache keeps the ones it wants and returns the rest
     for the scheduler to free; then `unlock(handle)`;
  3. out of pages: `evict(n)` drops up to n unlocked cached pages and returns them to be freed.
NaiveCache (no reuse) is the trivial implementation; a radix tree implements the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class PrefixMatch:
    length: int  # matched tokens, a multiple of the page size
    pages: list[int] = field(default_factory=list)  # the pages holding them, in order
    handle: object | None = None  # what lock/unlock take; None when nothing matched


@dataclass
class PrefixCacheStats:
    cached_pages: int = 0  # pages the cache holds
    evictable_pages: int = 0  # of which no running request has locked
    hit_tokens: int = 0  # tokens matched over all match_prefix calls
    queried_tokens: int = 0  # tokens asked for over all match_prefix calls


class PrefixCache(ABC):
    # Whether inserted prefixes can be matched later: the scheduler defers a request that would compute
    # the same tokens as another in one step only when waiting lets it read them from the cache.
    keeps_prefixes = True

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size

    @abstractmethod
    def match_prefix(self, token_ids: Sequence[int], *, count: bool = True) -> PrefixMatch:
        """The longest cached prefix of `token_ids`, whole pages only. `count=False` keeps the lookup out of
        the hit statistics (the scheduler re-reading pages it has just inserted)."""

    @abstractmethod
    def lock(self, handle: object | None) -> None:
        """Protect a match's pages from eviction (reference-counted; None is a no-op)."""

    @abstractmethod
    def unlock(self, handle: object | None) -> None:
        """Undo one `lock`."""

    @abstractmethod
    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> list[int]:
        """Offer `pages` holding the K/V of `token_ids`; return the pages the caller must free.

        Pages already cached under the same ids stay cached and are not returned; pages duplicating
        cached content, pages only partly covered by `token_ids` and pages beyond it are returned.
        """

    @abstractmethod
    def evict(self, num_pages: int) -> list[int]:
        """Drop up to `num_pages` unlocked pages (least recently used first) and return them."""

    @abstractmethod
    def stats(self) -> PrefixCacheStats:
        """A snapshot of the cache's counters."""
