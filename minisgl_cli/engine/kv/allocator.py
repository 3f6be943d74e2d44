"""PageAllocator: hands out fixed-size pages of KV slots; page g holds slots [g * page_size, (g+1) * page_size)."""

from __future__ import annotations

# Page 0 is never handed out: its slots are where padding tokens (and unused page-table entries)
# point, so a padded batch can write k/v without clobbering a live request.
PADDING_PAGE = 0


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError("a KV pool needs at least 2 pages (page 0 is reserved for padding)")
        self.num_pages = num_pages
        self.page_size = page_size
        # A stack popped from the end: low page ids first, and a freed page is reused first (warm in cache).
        self._free = list(range(num_pages - 1, PADDING_PAGE, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        """Pages that can ever be handed out (all but the padding page)."""
        return self.num_pages - 1

    def alloc(self, n: int) -> list[int] | None:
        """n page ids, or None (and nothing taken) when fewer than n are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        pages.reverse()
        return pages

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def slots(self, pages: list[int], start: int, end: int) -> list[int]:
        """KV slots of positions [start, end) of a sequence whose i-th page is `pages[i]`."""
        ps = self.page_size
        return [pages[p // ps] * ps + p % ps for p in range(start, end)]
