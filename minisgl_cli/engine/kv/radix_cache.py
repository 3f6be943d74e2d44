"""RadixCache: a radix tree over token ids whose nodes own the KV pages of their edge (`--cache-type radix`).

Edges are cut only at page boundaries, so every edge holds a whole number of pages and page i of an edge
holds the K/V of the edge's tokens [i * page_size, (i + 1) * page_size). Children are keyed by their
edge's first page of tokens: two children of one node never start with the same page, which makes the
tree a radix tree over pages (over tokens when page_size is 1).

A lock on a node counts on the node and all its ancestors, since a request that reads a prefix reads
every page on the path to it. Only unlocked leaves are evicted, least recently used first; evicting a
leaf can make its parent an evictable leaf in turn.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from minisgl_cli.engine.kv.prefix_cache import PrefixCache, PrefixCacheStats, PrefixMatch


@dataclass(eq=False)
class _Node:
    key: tuple[int, ...]  # the edge's tokens from the parent, a whole number of pages
    pages: list[int]  # len(key) // page_size pages holding their K/V
    parent: _Node | None
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)  # by the child's first page
    lock_ref: int = 0  # locks on this node or any descendant
    last_access: int = 0  # logical clock of the last match or insert through this node


class RadixCache(PrefixCache):
    def __init__(self, page_size: int) -> None:
        super().__init__(page_size)
        self._root = _Node(key=(), pages=[], parent=None)
        self._root.lock_ref = 1  # the root owns no pages and is never evicted
        # A logical clock rather than wall time: ties and order stay deterministic (and testable).
        self._clock = itertools.count(1)
        self._cached_pages = 0
        self._evictable_pages = 0  # pages of nodes with no lock
        self._hit_tokens = 0
        self._queried_tokens = 0

    # ---- the PrefixCache interface

    def match_prefix(self, token_ids: Sequence[int], *, count: bool = True) -> PrefixMatch:
        node, length, pages = self._walk(self._page_key(token_ids))
        if count:
            self._queried_tokens += len(token_ids)
            self._hit_tokens += length
        return PrefixMatch(length=length, pages=pages, handle=None if node is self._root else node)

    def lock(self, handle: object | None) -> None:
        node = self._node(handle)
        while node is not None and node is not self._root:
            if node.lock_ref == 0:
                self._evictable_pages -= len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, handle: object | None) -> None:
        node = self._node(handle)
        while node is not None and node is not self._root:
            if node.lock_ref <= 0:
                raise RuntimeError("a prefix-cache node was unlocked more often than it was locked")  # a bug
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable_pages += len(node.pages)
            node = node.parent

    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> list[int]:
        ps = self.page_size
        num_pages = min(len(token_ids) // ps, len(pages))
        key = tuple(token_ids[: num_pages * ps])
        # Pages past the whole-page prefix (a partly filled last page, room reserved for new tokens).
        to_free = list(pages[num_pages:])
        node, length, cached = self._walk(key)
        # The cached pages of the shared prefix stay; the caller's copies of them go back, unless they
        # are the very same pages (the request read them from this cache at admission).
        to_free += [mine for mine, theirs in zip(pages, cached, strict=False) if mine != theirs]
        if length < len(key):
            leaf = _Node(key=key[length:], pages=list(pages[length // ps : num_pages]), parent=node)
            leaf.last_access = next(self._clock)
            node.children[leaf.key[:ps]] = leaf
            self._cached_pages += len(leaf.pages)
            self._evictable_pages += len(leaf.pages)
        return to_free

    def evict(self, num_pages: int) -> list[int]:
        """Drop least recently used unlocked leaves until at least `num_pages` pages are freed (or none is
        left to drop). A leaf goes whole, so this may return more than `num_pages` pages."""
        freed: list[int] = []
        if num_pages <= 0:
            return freed
        order = itertools.count()  # breaks ties in last_access without comparing nodes
        heap = [(n.last_access, next(order), n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        while heap and len(freed) < num_pages:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[: self.page_size]]
            freed += leaf.pages
            self._cached_pages -= len(leaf.pages)
            self._evictable_pages -= len(leaf.pages)
            if parent is not self._root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, next(order), parent))
        return freed

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            cached_pages=self._cached_pages,
            evictable_pages=self._evictable_pages,
            hit_tokens=self._hit_tokens,
            queried_tokens=self._queried_tokens,
        )

    # ---- the tree

    def _page_key(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        """The whole-page prefix of `token_ids`: nothing shorter than a page is ever cached."""
        return tuple(token_ids[: len(token_ids) // self.page_size * self.page_size])

    def _walk(self, key: tuple[int, ...]) -> tuple[_Node, int, list[int]]:
        """Follow `key` (whole pages) down the tree; split the last edge where the match ends inside it.

        Returns the deepest matched node, the matched length in tokens and the matched pages; every node
        on the path counts as used now.
        """
        ps = self.page_size
        now = next(self._clock)
        node, length, pages = self._root, 0, []
        while length < len(key):
            child = node.children.get(key[length : length + ps])
            if child is None:
                break
            shared = _common_pages(child.key, key, length, ps)
            if shared < len(child.key):
                child = self._split(child, shared)
            child.last_access = now
            pages += child.pages
            length += len(child.key)
            node = child
        return node, length, pages

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node`'s edge after `at` tokens (a page boundary); return the new upper node.

        The upper part inherits the lock count: every lock on `node` also covers its whole path.
        """
        parent = node.parent
        assert parent is not None
        upper = _Node(
            key=node.key[:at],
            pages=node.pages[: at // self.page_size],
            parent=parent,
            lock_ref=node.lock_ref,
            last_access=node.last_access,
        )
        node.key = node.key[at:]
        node.pages = node.pages[at // self.page_size :]
        node.parent = upper
        upper.children[node.key[: self.page_size]] = node
        parent.children[upper.key[: self.page_size]] = upper
        return upper

    def _nodes(self) -> list[_Node]:
        out, stack = [], list(self._root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def _node(self, handle: object | None) -> _Node | None:
        if handle is None or isinstance(handle, _Node):
            return handle
        raise TypeError(f"not a RadixCache handle: {handle!r}")


def _common_pages(edge: tuple[int, ...], key: tuple[int, ...], start: int, page_size: int) -> int:
    """How many tokens of `edge` equal `key[start:]`, rounded down to whole pages."""
    n = min(len(edge), len(key) - start)
    i = 0
    while i < n and edge[i] == key[start + i]:
        i += 1
    return i // page_size * page_size
